"""Policies by name: name -> "module:Class", imported when used (STYLE: the registry lives apart from
the interface)."""

from __future__ import annotations

import importlib

from partitioner.moe2.policy import Policy

POLICIES: dict[str, str] = {
    "moe2": "partitioner.moe2.baselines:MoE2",
    "best_single": "partitioner.moe2.baselines:BestSingle",
    "greedy": "partitioner.moe2.baselines:Greedy",
    "random": "partitioner.moe2.baselines:RandomSubset",
    "edge_only": "partitioner.moe2.baselines:EdgeOnly",
    "cloud_only": "partitioner.moe2.baselines:CloudOnly",
    "threshold": "partitioner.moe2.baselines:Threshold",
    "preference": "partitioner.moe2.baselines:Preference",
}


def make_policy(name: str) -> Policy:
    """The policy `name` with its defaults. Raises ValueError for an unknown name."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(POLICIES))}")
    module, _, cls = POLICIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
