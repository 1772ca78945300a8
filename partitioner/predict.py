"""One placement's prediction, from everything the hub knows about the device.

`partitioner.cost.predict` is the analytic roofline over a profile; this is what the router uses:

- the device's own calibration (`device_profiles.Calibration`, measured by the agent at start-up or
  by `tandem profile`) where there is one, the profile's roofline where there is not;
- the online corrections the hub refits from every request's measured times (`Corrections`: a gain
  on prefill and one on decode, partitioner.calibration.OnlineGain) and the link as measured (the
  work channel's round trips and what each request spent outside the engine);
- for an emulated device, whichever is slower of its profile and this host's calibrated speed: an
  agent paces to its profile and can only slow down, so a profile faster than the host is not a
  speed it can deliver (`emulation_floor` says so).

Units: milliseconds, joules.
"""

from __future__ import annotations

from dataclasses import dataclass

from device_profiles import Calibration, DeviceProfile
from partitioner import calibration as cal
from partitioner.cost import BYTES_PER_PROMPT_TOKEN, BYTES_PER_STREAMED_TOKEN, Estimate, ModelCost
from partitioner.cost import decode_ms as roofline_decode_ms
from partitioner.cost import prefill_ms as roofline_prefill_ms


@dataclass(frozen=True)
class Corrections:
    """What the hub has learnt about a device since its calibration."""

    prefill_gain: float = 1.0
    """Measured over predicted prefill, refitted online (1: the calibration holds)."""
    decode_gain: float = 1.0
    """Measured over predicted decode step, refitted online."""
    link_ms: float | None = None
    """Time outside the engine before the first token (round trip, prompt transfer, the hub's own
    handling), as measured; None: the profile's link figures."""


def compute_ms(
    profile: DeviceProfile, cost: ModelCost, calibration: Calibration | None, prompt_tokens: int, context: float
) -> tuple[float, float]:
    """(prefill ms, one decode step ms) of the engine alone, before online corrections: calibrated
    when a calibration is given (its fixed request overhead in the prefill), else the roofline."""
    if calibration is None:
        return roofline_prefill_ms(profile, cost, prompt_tokens), roofline_decode_ms(profile, cost, context)
    prefill = calibration.request_ms + cal.prefill_ms(calibration, cost, prompt_tokens)
    return prefill, cal.decode_ms(calibration, cost, context)


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
) -> Estimate:
    """TTFT, time per token, total time and energy of one request on one device.

    An emulated device runs each phase at max(profile's roofline, host's calibrated time); energy is
    the calibration's measured power where a sensor measured it, else the profile's. Raises
    ValueError for prompt_tokens or max_new_tokens < 1."""
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens}, {max_new_tokens}")
    context = prompt_tokens + max_new_tokens / 2  # mean context over the decode steps
    prefill, step = compute_ms(profile, cost, calibration, prompt_tokens, context)
    if emulated and calibration is not None:
        p_prof, d_prof = compute_ms(profile, cost, None, prompt_tokens, context)
        prefill, step = max(prefill, p_prof), max(step, d_prof)
    prefill *= corrections.prefill_gain
    step *= corrections.decode_gain
    link = profile.link
    if corrections.link_ms is not None:
        link_ms = corrections.link_ms
    else:
        bytes_in = prompt_tokens * BYTES_PER_PROMPT_TOKEN if context_bytes_in is None else context_bytes_in
        link_ms = link.rtt_ms + 8e3 * bytes_in / (link.downlink_mbps * 1e6)
    ttft = link_ms + prefill
    tpot = step + 8e3 * BYTES_PER_STREAMED_TOKEN / (link.uplink_mbps * 1e6)
    steps = max_new_tokens - 1  # the first token comes out of prefill
    power = calibration.power_w if calibration is not None and calibration.power_w > 0 else profile.power_active_w
    energy = power * (prefill + steps * step) / 1e3
    return Estimate(
        ttft_ms=ttft,
        tpot_ms=tpot,
        total_ms=ttft + steps * tpot,
        energy_j=energy,
        edge_energy_j=energy if profile.kind == "edge" else 0.0,
        prefill_ms=prefill,
        decode_ms=step,
    )
