"""One placement's prediction, from everything the hub knows about the device.

`partitioner.cost.predict` is the analytic roofline over a profile; this is what the router uses:

- the device's own calibration (`device_profiles.Calibration`, measured by the agent at start-up or
  by `tandem profile`) where there is one, the profile's roofline where there is not;
- the online corrections the hub refits from every request's measured times (`Corrections`: an
  affine correction a + b x on prefill and one on decode, partitioner.calibration.OnlineAffine) and
  the link as measured (the work channel's round trips and what each request spent outside the
  engine);
- for an emulated device, whichever is slower of its profile and this host's calibrated speed: an
  agent paces to its profile and can only slow down, so a profile faster than the host is not a
  speed it can deliver (`emulation_floor` says so).

Units: milliseconds, joules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from device_profiles import Calibration, DeviceProfile
from partitioner import calibration as cal
from partitioner import split
from partitioner.cost import BYTES_PER_PROMPT_TOKEN, Estimate, ModelCost, assemble, kv_predictor_layers, link_ms
from partitioner.cost import decode_ms as roofline_decode_ms
from partitioner.cost import kv_prefill_ms as roofline_kv_prefill_ms
from partitioner.cost import prefill_ms as roofline_prefill_ms


@dataclass(frozen=True)
class Corrections:
    """What the hub has learnt about a device since its calibration."""

    prefill: cal.Affine = field(default_factory=cal.Affine)
    """Measured prefill as a + b x predicted, refitted online (a = 0, b = 1: the calibration holds)."""
    decode: cal.Affine = field(default_factory=cal.Affine)
    """Measured decode step as a + b x predicted, refitted online."""
    link_ms: float | None = None
    """Time outside the engine before the first token (round trip, prompt transfer, the hub's own
    handling), as measured; None: the profile's link figures."""


def compute_ms(
    profile: DeviceProfile,
    cost: ModelCost,
    calibration: Calibration | None,
    prompt_tokens: int,
    context: float,
    emulated: bool = False,
    kv_layers: int | None = None,
    skip_layers: int | None = None,
) -> tuple[float, float]:
    """(prefill ms, one decode step ms) of the engine alone, before online corrections: calibrated
    when a calibration is given (its fixed request overhead in the prefill), else the roofline. An
    emulated device runs each at the slower of its profile's roofline and the calibrated host.
    `kv_layers`: with KV prediction (models.kvpred), the prompt prefills through that many auxiliary
    layers and the whole model takes its last token as one decode step; None: the whole model.
    `skip_layers`: with layer skipping (models.skip), decode skips that many layers (`skipped_step`);
    the prefill still runs every layer."""
    prefill, step = _compute_ms(profile, cost, calibration, prompt_tokens, context, emulated, kv_layers)
    if skip_layers:
        fixed = calibration.decode[0] if calibration is not None and not emulated else 0.0
        step = skipped_step(step, profile, cost, context, skip_layers, fixed)
    return prefill, step


def head_share(profile: DeviceProfile, cost: ModelCost, context: float) -> float:
    """The final norm and output head's share of a decode step at `context` positions, as the roofline
    shares it (a calibration measures whole steps; `stage_parts` shares them alike)."""
    block, head = split.layer_decode_ms(profile, cost, context), split.head_decode_ms(profile, cost, context)
    return head / (cost.n_layers * block + head)


def skipped_step(
    step: float, profile: DeviceProfile, cost: ModelCost, context: float, layers: int, fixed: float = 0.0
) -> float:
    """A decode step of `step` ms when it skips `layers` of the model's n layers: its `fixed` ms (the
    calibration's per-step overhead: sampling, dispatch) and the head's share of the rest
    (`head_share`) unscaled, the blocks' scaled to the n - layers that run."""
    head = head_share(profile, cost, context)
    n = cost.n_layers
    fixed = min(max(fixed, 0.0), step)
    return fixed + (step - fixed) * (head + (1 - head) * (n - layers) / n)


def _compute_ms(
    profile: DeviceProfile,
    cost: ModelCost,
    calibration: Calibration | None,
    prompt_tokens: int,
    context: float,
    emulated: bool,
    kv_layers: int | None,
) -> tuple[float, float]:
    """compute_ms without layer skipping."""
    if calibration is None or emulated:
        roof_prefill = (
            roofline_prefill_ms(profile, cost, prompt_tokens)
            if kv_layers is None
            else roofline_kv_prefill_ms(profile, cost, prompt_tokens, kv_layers)
        )
        roofline = roof_prefill, roofline_decode_ms(profile, cost, context)
        if calibration is None:
            return roofline
    if kv_layers is None:
        prefill = calibration.request_ms + cal.prefill_ms(calibration, cost, prompt_tokens)
    else:  # the auxiliary layers and the predictors (no head), then the last token through all
        aux = (kv_layers + kv_predictor_layers(cost)) * cal.layer_prefill_ms(calibration, cost, prompt_tokens)
        prefill = calibration.request_ms + aux + cal.decode_ms(calibration, cost, prompt_tokens)
    step = cal.decode_ms(calibration, cost, context)
    if emulated:
        return max(prefill, roofline[0]), max(step, roofline[1])
    return prefill, step


def faster_than_host(
    profile: DeviceProfile, cost: ModelCost, calibration: Calibration, prompt_tokens: int = 128, context: float = 192
) -> str:
    """Why an emulated `profile` cannot be kept on the host `calibration` measured ('' when it can):
    its roofline prefills or decodes faster than the host does, so the device is predicted at the
    host's speed instead. What the agent and `make run` say for such a device."""
    p_prof, d_prof = compute_ms(profile, cost, None, prompt_tokens, context)
    p_host, d_host = compute_ms(profile, cost, calibration, prompt_tokens, context)
    if p_prof >= p_host and d_prof >= d_host:
        return ""
    return (
        f"profile {profile.name} is faster than this host (prefill of {prompt_tokens} tokens {p_prof:.1f} against "
        f"{p_host:.1f} ms, a decode step {d_prof:.2f} against {d_host:.2f} ms): predicted at the host's speed"
    )


def predict(
    profile: DeviceProfile,
    cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    calibration: Calibration | None = None,
    corrections: Corrections = Corrections(),
    emulated: bool = False,
    context_bytes_in: float | None = None,
    kv_layers: int | None = None,
    skip_layers: int | None = None,
) -> Estimate:
    """TTFT, time per token, total time and energy of one request on one device.

    An emulated device runs each phase at max(profile's roofline, host's calibrated time); energy is
    the calibration's measured power where a sensor measured it, else the profile's. `kv_layers`:
    with KV prediction, the auxiliary model's layer count; `skip_layers`: with layer skipping, the
    layers decode skips (compute_ms). Raises ValueError for prompt_tokens or max_new_tokens < 1."""
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens}, {max_new_tokens}")
    context = prompt_tokens + max_new_tokens / 2  # mean context over the decode steps
    prefill, step = compute_ms(profile, cost, calibration, prompt_tokens, context, emulated, kv_layers, skip_layers)
    prefill = corrections.prefill.apply(prefill)
    step = corrections.decode.apply(step)
    link = corrections.link_ms
    if link is None:
        link = link_ms(
            profile, prompt_tokens * BYTES_PER_PROMPT_TOKEN if context_bytes_in is None else context_bytes_in
        )
    power = calibration.power_w if calibration is not None and calibration.power_w > 0 else profile.power_active_w
    return assemble(profile, link, prefill, step, max_new_tokens, power)


def stage_parts(calibration: Calibration | None, emulated: bool = False) -> split.Timings | None:
    """A device's per-block times for split plans (partitioner.split's `timings`), from its calibration:
    a block's prefill as calibrated, the head's with the request's fixed overhead; a decode step as
    calibrated, shared between blocks and head as the roofline shares it (the calibration measures
    whole steps). An emulated device takes the slower of each and the roofline's. None without a
    calibration: the roofline stands."""
    if calibration is None:
        return None

    def parts(
        profile: DeviceProfile, cost: ModelCost, prompt_tokens: int, context: float
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        n = cost.n_layers
        roof_block, roof_head = (
            split.layer_decode_ms(profile, cost, context),
            split.head_decode_ms(profile, cost, context),
        )
        head_share = roof_head / (n * roof_block + roof_head)
        step = cal.decode_ms(calibration, cost, context)
        prefill = (cal.layer_prefill_ms(calibration, cost, prompt_tokens), calibration.head_ms + calibration.request_ms)
        decode = (step * (1 - head_share) / n, step * head_share)
        if emulated:
            roof_p = (
                split.layer_prefill_ms(profile, cost, prompt_tokens),
                split.head_prefill_ms(profile, cost, prompt_tokens),
            )
            prefill = (max(prefill[0], roof_p[0]), max(prefill[1], roof_p[1]))
            decode = (max(decode[0], roof_block), max(decode[1], roof_head))
        return prefill, decode

    return parts
