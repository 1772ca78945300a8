"""Split inference (issue 16): where to cut a model's layers between devices, as pure solvers.

- `single_cut`: one edge-to-cloud cut k. The edge runs layers [0, k), the cloud runs [k, N) and the
  head; k = 0 is cloud-only, k = N edge-only (the edge runs the head too). Minimises TTFT, time per
  token or edge energy within the other budgets and both devices' memory.
- `pipeline`: contiguous layer ranges over an ordered chain of devices joined by links (EdgeShard's
  dynamic program, O(devices x layers^2)), for latency (TTFT or time per token) or throughput (the
  bottleneck device's time per decode step, several requests in flight).

The request, the same for both (a single cut is the chain [edge, cloud] over one link):

- the prompt starts on the chain's first device. The first device holding layers embeds it (the
  text, prompt_tokens x BYTES_PER_PROMPT_TOKEN, travels up the chain to it); each stage sends the
  hidden state of every prompt position (prompt_tokens x hidden bytes) up to the next; the last
  stage runs the head, and the first token is out (TTFT; delivering tokens to the caller is outside
  the plan);
- each decode step: the last stage sends the token id (TOKEN_ID_BYTES) down to the first stage,
  which must embed it, and one hidden vector goes up every link between them. A plan on one device
  has no link in its decode loop (cloud-only and edge-only);
- a device between the first and the last stage that holds no layers relays what crosses it (the
  chain's links are the only paths);
- crossing a link costs half its round trip plus the bytes at that direction's rate (`transfer_ms`).
  links[i] joins devices[i] and devices[i + 1]; its uplink runs from i to i + 1, towards the cloud,
  as partitioner.cost's uplink runs from device to hub.

Each device's busy time is local to it: its layers (and the head, if it runs it) plus what it sends
(up its link, down to its previous device). TTFT and time per token are sums of these over the
chain; the throughput bottleneck is their maximum per decode step (conservative: a device counts a
link's latency as busy, as if it sent the next activation only once the last had arrived).
Decode steps are costed at the mean context, prompt_tokens + max_new_tokens / 2 (as cost.predict);
memory holds the whole context, prompt_tokens + max_new_tokens, with cost.MEMORY_HEADROOM free.
Edge energy: power_active_w x compute time of devices of kind "edge" (links' energy not counted),
as cost.Estimate.edge_energy_j.

Units: bytes, milliseconds, joules. Layer ranges are half-open [start, end), global indices.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from device_profiles import DeviceProfile, LinkSpec
from partitioner.cost import BYTES_PER_PROMPT_TOKEN, MEMORY_HEADROOM, ModelCost

Wire = Literal["fp16", "int8"]
Direction = Literal["up", "down"]
CutObjective = Literal["ttft_ms", "tpot_ms", "energy_j"]
PipelineObjective = Literal["ttft_ms", "tpot_ms", "bottleneck_ms"]

TOKEN_ID_BYTES = 4.0
"""Bytes of the token id the last stage sends back to the embedding stage each decode step (int32)."""
BUDGETS = ("ttft_ms", "tpot_ms", "energy_j")
"""The single cut's budgets, in the order a tie between binding constraints is broken."""


class PlanError(ValueError):
    """No plan fits. `binding` names the constraint that rules out the closest plan: "memory",
    "ttft_ms", "tpot_ms", "energy_j" or (pipeline throughput) "bottleneck_ms"."""

    def __init__(self, message: str, binding: str) -> None:
        super().__init__(message)
        self.binding = binding


@dataclass(frozen=True)
class Stage:
    """One device's part of a plan."""

    device: str
    """The device's name in the chain ("edge" or "cloud" for a single cut)."""
    profile: DeviceProfile
    """Its device class."""
    start: int
    """First layer it runs."""
    end: int
    """One past its last layer; the stage with end == n_layers runs the head too."""


@dataclass(frozen=True)
class Plan:
    """Where each layer runs, and what the request costs there."""

    stages: tuple[Stage, ...]
    """Devices holding layers, in chain order: the first embeds, the last runs the head."""
    cuts: tuple[int, ...]
    """One boundary per link: device i runs [cuts[i-1], cuts[i]) (0 before the first, N after the last)."""
    ttft_ms: float
    """Prompt text and hidden states up the chain, every stage's prefill, the head."""
    tpot_ms: float
    """One decode step around the loop: stages, hidden vectors up, the token id down."""
    edge_energy_j: float
    """Energy of the edge-kind devices' compute over the whole request."""
    bottleneck_ms: float
    """The busiest device's time per decode step: the pipeline's time per token, requests in flight."""
    memory_bytes: tuple[float, ...]
    """What each stage holds: its layers' weights and KV cache, the embedding and head where it runs them."""
    objective: str
    """What the solver minimised."""


# -- per-layer costs: partitioner.cost's roofline, in parts ---------------------------------------------


def _ms(amount: float, rate_per_s: float) -> float:
    return 1e3 * amount / rate_per_s


def _rates(profile: DeviceProfile) -> tuple[float, float]:
    """(FLOP/s, bytes/s) the roofline reaches on `profile`, as partitioner.cost counts them."""
    flops = profile.compute_tflops * 1e12 * profile.efficiency.prefill
    return flops, profile.memory_bandwidth_gbs * 1e9 * profile.efficiency.decode


# cost.prefill_ms and cost.decode_ms take the max of two whole-model totals, not a sum of per-part
# maxima. Each part below takes its share of the bound that binds for the whole model, so that
# n_layers x layer + head equals the whole; the blocks are alike, so they bind alike (the head's
# share of either total is small). Sliding and global layers get the mean attention share: ModelCost
# counts sliding layers, not which ones they are.


def _prefill_parts(profile: DeviceProfile, cost: ModelCost, prompt_tokens: int) -> tuple[float, float]:
    """(one block, the head) of cost.prefill_ms."""
    flops_rate, bytes_rate = _rates(profile)
    if _ms(cost.prefill_flops(prompt_tokens), flops_rate) >= _ms(cost.weight_bytes_per_token, bytes_rate):
        attn = 4.0 * cost.attn_width * cost.prompt_keys(prompt_tokens) / cost.n_layers
        block = 2.0 * cost.layer_matmul_params * prompt_tokens + attn
        return _ms(block, flops_rate), _ms(2.0 * cost.head_params, flops_rate)  # head: last position only
    byte = cost.bits_per_weight / 8
    head = (cost.final_norm_params + cost.head_params) * byte
    return _ms(cost.layer_params * byte, bytes_rate), _ms(head, bytes_rate)


def _decode_parts(profile: DeviceProfile, cost: ModelCost, context: float) -> tuple[float, float]:
    """(one block, the head) of cost.decode_ms."""
    flops_rate, bytes_rate = _rates(profile)
    kv = cost.kv_bytes_per_token * cost.keys_read(context) / cost.n_layers  # KV bytes read, all layers
    if _ms(cost.weight_bytes_per_token + kv, bytes_rate) >= _ms(cost.flops_per_token(round(context)), flops_rate):
        byte = cost.bits_per_weight / 8
        head = (cost.final_norm_params + cost.head_params) * byte
        return _ms(cost.layer_params * byte + kv / cost.n_layers, bytes_rate), _ms(head, bytes_rate)
    attn = 4.0 * cost.attn_width * cost.keys_read(round(context)) / cost.n_layers
    return _ms(2.0 * cost.layer_matmul_params + attn, flops_rate), _ms(2.0 * cost.head_params, flops_rate)


def layer_prefill_ms(profile: DeviceProfile, cost: ModelCost, prompt_tokens: int) -> float:
    """One block's share of cost.prefill_ms: n_layers x this + head_prefill_ms is the whole."""
    return _prefill_parts(profile, cost, prompt_tokens)[0]


def head_prefill_ms(profile: DeviceProfile, cost: ModelCost, prompt_tokens: int) -> float:
    """The final norm and output head's share of cost.prefill_ms (the embedding lookup costs nothing)."""
    return _prefill_parts(profile, cost, prompt_tokens)[1]


def layer_decode_ms(profile: DeviceProfile, cost: ModelCost, context: float) -> float:
    """One block's share of cost.decode_ms at `context` positions."""
    return _decode_parts(profile, cost, context)[0]


def head_decode_ms(profile: DeviceProfile, cost: ModelCost, context: float) -> float:
    """The final norm and output head's share of cost.decode_ms at `context` positions."""
    return _decode_parts(profile, cost, context)[1]


def hidden_bytes(cost: ModelCost, wire: Wire = "fp16") -> float:
    """Bytes of one position's hidden state on the wire (models.stage): dim x 2 (fp16) or dim x 1
    (int8), each with one fp32 scale (Gemma's residual stream outgrows fp16's range unscaled). The
    hidden width is the final norm's length (one weight per element)."""
    dim = cost.final_norm_params
    if wire == "fp16":
        return 2.0 * dim + 4.0
    if wire == "int8":
        return dim + 4.0
    raise ValueError(f"wire must be 'fp16' or 'int8', got {wire!r}")


def transfer_ms(link: LinkSpec, n_bytes: float, direction: Direction) -> float:
    """One crossing of `link`: half its round trip plus `n_bytes` at the direction's rate ("up":
    towards the cloud, at uplink_mbps; "down": back, at downlink_mbps)."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    mbps = link.uplink_mbps if direction == "up" else link.downlink_mbps
    return link.rtt_ms / 2 + _ms(8 * n_bytes, mbps * 1e6)


def stage_memory_bytes(cost: ModelCost, start: int, end: int, context_tokens: float) -> float:
    """What a device running layers [start, end) holds: their weights and KV cache of `context_tokens`,
    the embedding table if it embeds (start 0), the final norm and head if it runs them (end N); a
    tied head shares the table when one device does both. The whole model on one device is
    cost.memory_bytes(context_tokens)."""
    byte = cost.bits_per_weight / 8
    layer = cost.layer_weight_bytes + cost.kv_bytes_per_token / cost.n_layers * context_tokens
    total = (end - start) * layer
    embeds = start == 0
    if embeds:
        total += cost.embed_params * byte
    if end == cost.n_layers:
        total += (cost.final_norm_params + (0 if cost.tied and embeds else cost.head_params)) * byte
    return total


# -- the chain: every figure a solve needs, computed once -----------------------------------------------


@dataclass(frozen=True)
class _Device:
    name: str
    profile: DeviceProfile
    prefill: tuple[float, float]  # (one block, head) ms
    decode: tuple[float, float]  # (one block, head) ms, at the mean context
    cap: float  # bytes it may fill


@dataclass(frozen=True)
class _Link:
    text_up: float  # the prompt text, ms
    prompt_up: float  # every prompt position's hidden state
    step_up: float  # one hidden vector
    token_down: float  # one token id


@dataclass(frozen=True)
class _Chain:
    devices: tuple[_Device, ...]
    links: tuple[_Link, ...]
    cost: ModelCost
    context: float  # positions memory holds
    steps: int  # decode steps after the first token


def _check_request(cost: ModelCost, prompt_tokens: int, max_new_tokens: int, wire: Wire) -> None:
    if prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens and max_new_tokens must be >= 1, got {prompt_tokens}, {max_new_tokens}")
    if cost.n_layers < 1:
        raise ValueError(f"the model must have at least one layer, got n_layers={cost.n_layers}")
    hidden_bytes(cost, wire)  # raises for an unknown wire format


def _check_limit(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0: no limit), got {value!r}")


Timings = Callable[[DeviceProfile, ModelCost, int, float], tuple[tuple[float, float], tuple[float, float]]]
"""(profile, cost, prompt tokens, mean context) -> ((one block, head) of prefill, (one block, head) of a
decode step), ms: a device's own measured speed in place of the roofline (partitioner.predict.stage_parts)."""


def _chain(
    devices: Sequence[tuple[str, DeviceProfile]],
    links: Sequence[LinkSpec],
    cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    wire: Wire,
    timings: Mapping[str, Timings] | None = None,
) -> _Chain:
    """Raises ValueError for an empty chain, repeated names or a link count other than devices - 1.
    `timings` (by device name) replaces the roofline's per-block times of those devices."""
    _check_request(cost, prompt_tokens, max_new_tokens, wire)
    if not devices:
        raise ValueError("the device list is empty: a plan needs at least one device")
    names = [name for name, _ in devices]
    if len(set(names)) != len(names):
        raise ValueError(f"device names must be unique, got {names}")
    if len(links) != len(devices) - 1:
        raise ValueError(f"{len(devices)} devices need {len(devices) - 1} links between them, got {len(links)}")
    mean_context = prompt_tokens + max_new_tokens / 2
    timings = timings or {}

    def parts(name: str, p: DeviceProfile) -> tuple[tuple[float, float], tuple[float, float]]:
        if name in timings:
            return timings[name](p, cost, prompt_tokens, mean_context)
        return _prefill_parts(p, cost, prompt_tokens), _decode_parts(p, cost, mean_context)

    devs = tuple(_Device(name, p, *parts(name, p), (1 - MEMORY_HEADROOM) * p.memory_gb * 1e9) for name, p in devices)
    hidden = hidden_bytes(cost, wire)
    text = prompt_tokens * BYTES_PER_PROMPT_TOKEN
    lks = tuple(
        _Link(
            transfer_ms(lk, text, "up"),
            transfer_ms(lk, prompt_tokens * hidden, "up"),
            transfer_ms(lk, hidden, "up"),
            transfer_ms(lk, TOKEN_ID_BYTES, "down"),
        )
        for lk in links
    )
    return _Chain(devs, lks, cost, prompt_tokens + max_new_tokens, max_new_tokens - 1)


def _fits(c: _Chain, i: int, j: int, k: int) -> bool:
    return j == k or stage_memory_bytes(c.cost, j, k, c.context) <= c.devices[i].cap


def _compute(parts: tuple[float, float], j: int, k: int, n: int) -> float:
    """Layers [j, k) and the head if this range ends the model (a device past the last stage runs none)."""
    return (k - j) * parts[0] + (parts[1] if k == n and j < n else 0.0)


def _ttft_part(c: _Chain, i: int, j: int, k: int) -> float:
    """Device i's share of TTFT, running [j, k): its prefill, and what it sends up its link (the text
    while no stage has run, hidden states while stages remain)."""
    n = c.cost.n_layers
    t = _compute(c.devices[i].prefill, j, k, n)
    if i < len(c.links):
        t += c.links[i].text_up if k == 0 else c.links[i].prompt_up if k < n else 0.0
    return t


def _step_part(c: _Chain, i: int, j: int, k: int) -> float:
    """Device i's busy time per decode step, running [j, k): its layers (and head), the hidden vector up
    its link while stages remain past it, the token id down its previous link while stages lie before it."""
    n = c.cost.n_layers
    t = _compute(c.devices[i].decode, j, k, n)
    if i < len(c.links) and 0 < k < n:
        t += c.links[i].step_up
    if i > 0 and 0 < j < n:
        t += c.links[i - 1].token_down
    return t


def _figures(c: _Chain, cuts: tuple[int, ...]) -> dict[str, float]:
    """TTFT, time per token, edge energy and bottleneck of boundaries `cuts` (one per link), from the
    device-local parts."""
    n = c.cost.n_layers
    bounds = (0, *cuts, n)
    ttft = tpot = bottleneck = energy = 0.0
    for i, d in enumerate(c.devices):
        j, k = bounds[i], bounds[i + 1]
        ttft += _ttft_part(c, i, j, k)
        step = _step_part(c, i, j, k)
        tpot += step
        bottleneck = max(bottleneck, step)
        if k > j and d.profile.kind == "edge":
            busy = _compute(d.prefill, j, k, n) + c.steps * _compute(d.decode, j, k, n)
            energy += d.profile.power_active_w * busy / 1e3
    return {"ttft_ms": ttft, "tpot_ms": tpot, "energy_j": energy, "bottleneck_ms": bottleneck}


def _plan(c: _Chain, cuts: tuple[int, ...], objective: str) -> Plan:
    bounds = (0, *cuts, c.cost.n_layers)
    held = [(d, bounds[i], bounds[i + 1]) for i, d in enumerate(c.devices) if bounds[i + 1] > bounds[i]]
    f = _figures(c, cuts)
    return Plan(
        stages=tuple(Stage(d.name, d.profile, j, k) for d, j, k in held),
        cuts=cuts,
        ttft_ms=f["ttft_ms"],
        tpot_ms=f["tpot_ms"],
        edge_energy_j=f["energy_j"],
        bottleneck_ms=f["bottleneck_ms"],
        memory_bytes=tuple(stage_memory_bytes(c.cost, j, k, c.context) for _, j, k in held),
        objective=objective,
    )


# -- the single cut ---------------------------------------------------------------------------------------


def single_cut(
    edge: DeviceProfile,
    cloud: DeviceProfile,
    cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    objective: CutObjective = "ttft_ms",
    ttft_ms: float = 0.0,
    tpot_ms: float = 0.0,
    energy_j: float = 0.0,
    link: LinkSpec | None = None,
    wire: Wire = "fp16",
    interior: bool = False,
    timings: Mapping[str, Timings] | None = None,
) -> Plan:
    """The cut k minimising `objective` within the budgets (0: no limit) and both devices' memory; the
    smallest k among equals. `link` joins edge and cloud (default: the edge's link to the hub).
    `interior`: only 0 < k < N, a real split (the hub lists edge-only and cloud-only apart).
    `timings` ("edge", "cloud"): measured per-block times in place of the roofline's.

    Raises ValueError for bad inputs, PlanError when no cut fits: binding "memory" if no cut fits in
    memory, else the worst-violated budget of the cut that comes closest (the hub router's rule: the
    least largest value/limit ratio).
    """
    if objective not in BUDGETS:
        raise ValueError(f"objective must be one of {list(BUDGETS)}, got {objective!r}")
    limits = {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "energy_j": energy_j}
    for name, value in limits.items():
        _check_limit(name, value)
    c = _chain(
        (("edge", edge), ("cloud", cloud)), (link or edge.link,), cost, prompt_tokens, max_new_tokens, wire, timings
    )
    n = cost.n_layers
    ks = range(1, n) if interior else range(n + 1)
    rows = [((k,), _figures(c, (k,))) for k in ks if _fits(c, 0, 0, k) and _fits(c, 1, k, n)]
    if not rows:
        raise PlanError(
            f"no cut of {n} layers between {edge.name} ({edge.memory_gb:g} GB) and {cloud.name} "
            f"({cloud.memory_gb:g} GB) fits in memory with a context of {c.context:g} tokens "
            f"({MEMORY_HEADROOM:.0%} of each kept free)",
            binding="memory",
        )
    ratios = [{b: f[b] / v for b, v in limits.items() if v} for _, f in rows]
    fitting = [(cuts, f) for (cuts, f), r in zip(rows, ratios, strict=True) if all(x <= 1 for x in r.values())]
    if fitting:
        cuts, _ = min(fitting, key=lambda row: row[1][objective])  # min keeps the first (smallest k) of equals
        return _plan(c, cuts, objective)
    worst = [max(r.values()) for r in ratios]
    at = worst.index(min(worst))
    binding = max(ratios[at], key=ratios[at].__getitem__)
    raise PlanError(
        f"no cut meets the budget: binding constraint {binding} — the closest cut (k={rows[at][0][0]} of {n}) "
        f"predicts {binding} = {rows[at][1][binding]:.4g} against a budget of {limits[binding]:.4g}",
        binding=binding,
    )


def evaluate(
    devices: Sequence[tuple[str, DeviceProfile]],
    links: Sequence[LinkSpec],
    cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    cuts: Sequence[int],
    wire: Wire = "fp16",
    timings: Mapping[str, Timings] | None = None,
) -> Plan:
    """The plan of given boundaries (one per link, non-decreasing in [0, N]): what a caller who pinned
    the cuts gets predicted. Memory is not checked (the figures say what it holds); raises ValueError
    for bad inputs or boundaries. `timings` (by device name): measured per-block times."""
    c = _chain(devices, links, cost, prompt_tokens, max_new_tokens, wire, timings)
    bounds = (0, *cuts, cost.n_layers)
    if len(cuts) != len(links) or any(b > a for a, b in zip(bounds[1:], bounds, strict=False)):
        raise ValueError(f"cuts must be {len(links)} non-decreasing boundaries in [0, {cost.n_layers}], got {cuts}")
    return _plan(c, tuple(cuts), "fixed")


# -- the pipeline ------------------------------------------------------------------------------------------


def pipeline(
    devices: Sequence[tuple[str, DeviceProfile]],
    links: Sequence[LinkSpec],
    cost: ModelCost,
    prompt_tokens: int,
    max_new_tokens: int,
    *,
    objective: PipelineObjective = "tpot_ms",
    limit: float = 0.0,
    wire: Wire = "fp16",
) -> Plan:
    """Contiguous layer ranges over the chain `devices` (name, profile), links[i] joining devices i and
    i + 1, minimising `objective`: "ttft_ms" or "tpot_ms" (latency, a sum over the chain) or
    "bottleneck_ms" (throughput, the busiest device per decode step). A device may hold no layers.
    Memory caps every device; `limit` caps the objective (0: none). Among equal plans, the earliest
    device takes the most layers (the lexicographically largest cuts): of alike devices, the first serves.

    Raises ValueError for bad inputs, PlanError (binding "memory", or the objective's name when the
    best plan exceeds `limit`).
    """
    parts: dict[str, tuple[Callable[[_Chain, int, int, int], float], Callable[[float, float], float]]] = {
        "ttft_ms": (_ttft_part, operator.add),
        "tpot_ms": (_step_part, operator.add),
        "bottleneck_ms": (_step_part, max),
    }
    if objective not in parts:
        raise ValueError(f"objective must be one of {list(parts)}, got {objective!r}")
    _check_limit("limit", limit)
    c = _chain(devices, links, cost, prompt_tokens, max_new_tokens, wire)
    part, combine = parts[objective]
    cuts = _dp(c, part, combine)
    if cuts is None:
        names = ", ".join(f"{d.name} ({d.profile.memory_gb:g} GB)" for d in c.devices)
        raise PlanError(
            f"no split of {cost.n_layers} layers over {names} fits in memory with a context of "
            f"{c.context:g} tokens ({MEMORY_HEADROOM:.0%} of each kept free)",
            binding="memory",
        )
    plan = _plan(c, cuts, objective)
    value = getattr(plan, objective)
    if limit and value > limit:
        raise PlanError(
            f"no plan meets the budget: binding constraint {objective} — the best plan predicts "
            f"{value:.4g} against a budget of {limit:.4g}",
            binding=objective,
        )
    return plan


def _dp(
    c: _Chain, part: Callable[[_Chain, int, int, int], float], combine: Callable[[float, float], float]
) -> tuple[int, ...] | None:
    """Suffix dynamic program: best[i][j] is the best value devices i.. reach when layers [0, j) ran
    before device i (best[D][N] = 0: nothing left). Each of the D x (N+1) states tries every end k >= j
    for device i, so O(D x N^2). Descending k with a strict < keeps the largest k of equals, and the
    forward walk from (0, 0) then gives the lexicographically largest cuts. None: nothing fits."""
    n, d = c.cost.n_layers, len(c.devices)
    best = [[math.inf] * (n + 1) for _ in range(d + 1)]
    choice = [[-1] * (n + 1) for _ in range(d + 1)]
    best[d][n] = 0.0
    for i in range(d - 1, -1, -1):
        after = best[i + 1]
        for j in range(n + 1) if i else (0,):  # device 0 always starts at layer 0
            value, pick = math.inf, -1
            for k in range(n, j - 1, -1):
                if after[k] == math.inf or not _fits(c, i, j, k):
                    continue
                v = combine(part(c, i, j, k), after[k])
                if v < value:
                    value, pick = v, k
            best[i][j], choice[i][j] = value, pick
    if best[0][0] == math.inf:
        return None
    cuts, j = [], 0
    for i in range(d - 1):
        j = choice[i][j]
        cuts.append(j)
    return tuple(cuts)
