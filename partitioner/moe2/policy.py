"""The plug-in point for choosing experts: MoE² and every baseline implement `Policy` (registry.py
names them)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from partitioner.moe2.experts import Budget, Problem
from partitioner.moe2.select import Selection


class Policy(ABC):
    """Chooses the experts a budget's requests are routed to."""

    @abstractmethod
    def choose(self, problem: Problem, budget: Budget) -> Selection:
        """A selection that meets `budget` (every constraint, worst case per request). Raises
        SelectionError naming the binding constraint when the policy finds none."""
