"""Pacing: an agent emulating a device class this machine is not.

Tokens are held back (by `models.serving.ServedModel`) so that TTFT and time per token are at
least what the cost model predicts for the profile. The prediction comes from
`partitioner.cost.served_model_cost`, the same rule the hub's router uses, so an emulated device
paces to exactly what the hub predicted for it. Pacing can only slow down: a profile faster than
this machine runs at this machine's speed, and the agent says so.
"""

from __future__ import annotations

from device_profiles import DeviceProfile
from models.serving import Pace, Pacer
from partitioner.cost import ModelCost, decode_ms, kv_prefill_ms, prefill_ms


def profile_pacer(profile: DeviceProfile, cost: ModelCost) -> Pacer:
    """Pace to the cost model's prediction for `profile` (link time excluded: that is real).

    `cost` is `served_model_cost(config, weight_bytes)` of the model as the agent serves it."""

    def pace(prompt_tokens: int, max_tokens: int, kv_layers: int | None = None) -> Pace:
        first = (
            prefill_ms(profile, cost, prompt_tokens)
            if kv_layers is None
            else kv_prefill_ms(profile, cost, prompt_tokens, kv_layers)  # KV prediction: what the hub predicts
        )
        return Pace(first, decode_ms(profile, cost, prompt_tokens + max_tokens / 2))

    return pace


def floor_pacer(inner: Pacer | None, tpot_ms: float) -> Pacer:
    """At least tpot_ms per token, and at least what `inner` asks for."""

    def pace(prompt_tokens: int, max_tokens: int, kv_layers: int | None = None) -> Pace:
        base = inner(prompt_tokens, max_tokens, kv_layers) if inner else Pace(0.0, 0.0)
        return Pace(base.ttft_ms, max(base.tpot_ms, tpot_ms))

    return pace
