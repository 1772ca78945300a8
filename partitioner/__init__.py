"""Tandem partitioner: where a request runs, predicted from device profiles and calibrations.

- `cost`: the analytic roofline, TTFT, time per output token and edge energy of a request on a device;
- `calibration`, `predict`: the roofline fitted to a device's measurements, and corrected online;
- `split`: split plans, a single edge-cloud cut and a pipeline over a chain of devices (pure solvers,
  equal to brute force), and `evaluate` for pinned cuts;
- `search`: the multi-objective search (optuna's NSGA-II) over cuts, precisions and pruning.
"""
