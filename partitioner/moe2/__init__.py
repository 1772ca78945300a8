"""MoE² (issue 17): which experts answer a request, chosen exactly within its energy and latency budgets.

- `experts`: the data (Expert, Budget, Problem) and a subset's monotone constraints;
- `objective`: the set function selection minimises (GatedObjective: the full-set gate's calibration
  loss on a subset) and per-request routing within a subset (`route`);
- `select`: the exact branch and bound (`select`), brute force for reference, and the cache;
- `policy`, `baselines`, `registry`: MoE² and the baselines behind one interface, by name;
- `table`: what a hub needs of a trained gate (its weights and the variants' losses on the calibration
  requests), read by cloud_hub.moe2_router.
"""
