"""Candidate placements as the router weighs them: the plain values routing reads.

A `Candidate` is one place a request could run (an online edge device x a model it serves, the hub's
own model, or a split over agents and the hub), with what the cost model needs to predict it and the
model variants it may run with (`KVOption`, `SkipOption`); `SplitSpec` holds a split's stages.
Placement sources build them (cloud_hub.placements, cloud_hub.split_plans), the cost model predicts
them (cloud_hub.estimates) and routers choose among them (cloud_hub.router). They live apart from all
three so that each imports them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloud_hub.calibrations import Tracker
from device_profiles import DeviceProfile, LinkSpec
from partitioner.cost import ModelCost
from partitioner.split import Timings

__all__ = ["Candidate", "KVOption", "SkipOption", "SplitSpec"]


@dataclass(frozen=True)
class KVOption:
    """A KV-prediction variant a candidate's model serves (ModelInfo.kv_variants; models.kvpred.KVVariant
    on the device): the hub's plain copy of what it costs and how close it stays."""

    depth: float
    """The auxiliary model's share of the layers (Sampling.kv_prediction)."""
    aux_layers: tuple[int, ...]
    """The base's layers the auxiliary model keeps: its prefill runs through these alone."""
    agreement: float
    """Greedy agreement with the unmodified model on held-out text, 0..1 (Budget.quality_floor)."""
    bpb_ratio: float = 1.0
    """Bits per byte relative to the unmodified model."""
    prefill_share: float = 1.0
    """The auxiliary prefill's measured cost as a share of the whole model's (where it was trained)."""


@dataclass(frozen=True)
class SkipOption:
    """A layer-skipping variant a candidate's model serves (ModelInfo.skip_variants; models.skip.SkipVariant
    on the device): the hub's plain copy of what it saves and how close it stays."""

    ratio: float
    """The trained skip ratio (Sampling.skip_ratio)."""
    layers: int
    """Layers decode skips at that ratio."""
    agreement: float
    """Greedy agreement with the unmodified model on held-out text, 0..1 (Budget.quality_floor)."""


@dataclass(frozen=True)
class SplitSpec:
    """A split placement: agents' stages in pipeline order, then the hub's own model."""

    agents: tuple[tuple[str, DeviceProfile], ...]
    """(device id, profile) of each agent stage, the first embedding the prompt."""
    cloud: DeviceProfile
    """The hub's hardware, which runs the last layers and the head."""
    cuts: tuple[int, ...] = ()
    """Pinned boundaries, one per agent (agent i ends at cuts[i]); empty: the partitioner's single cut."""
    timings: tuple[Timings | None, ...] = ()
    """Per agent, then the cloud: measured per-block times (partitioner.predict.stage_parts); None or
    empty: the profile's roofline."""
    links: tuple[LinkSpec, ...] = ()
    """Per agent, its link to the hub as measured (the work channel's round trips); empty: its profile's."""


@dataclass(frozen=True)
class Candidate:
    kind: str
    """One of "edge", "cloud" or "split"."""
    device_id: str
    """Empty for the cloud."""
    profile: DeviceProfile
    """The device class, for the cost model."""
    model: str
    """Zoo name of the model it would run."""
    cost: ModelCost
    """Per-token cost of that model."""
    queued: int = 0
    """Requests already running or waiting there."""
    emulated: bool = False
    """The device is paced to its profile."""
    tracker: Tracker | None = None
    """The device's calibration and measured corrections (None: the profile's roofline alone)."""
    chat_tokens: int = 0
    """Tokens its model's chat template adds (ModelInfo.chat_template_tokens); 0: unknown, the hub's
    default (cloud_hub.prompt.CHAT_TEMPLATE_TOKENS) stands."""
    split: SplitSpec | None = None
    """A split placement's stages (kind "split")."""
    skip_ratios: tuple[float, ...] = ()
    """The skip ratios its model's layer-skipping routers were trained for (ModelInfo.skip_ratios);
    empty: it cannot serve a request with a skip_ratio."""
    kv_variants: tuple[KVOption, ...] = ()
    """The KV-prediction variants its model serves (ModelInfo.kv_variants); empty: none."""
    kv: KVOption | None = None
    """Run with KV prediction at this variant (one of kv_variants); None: the unmodified model."""
    skip_variants: tuple[SkipOption, ...] = ()
    """The layer-skipping variants its model serves, measured (ModelInfo.skip_variants); empty: none."""
    skip: SkipOption | None = None
    """Run with layer skipping at this variant (one of skip_variants), as the router chose it; None: not."""
    quant: str = ""
    """The precision its model is served at (ModelInfo.quant); empty: unknown. The MoE² router maps
    (model, quant) to the gate's expert variant (partitioner.moe2.table)."""
