"""The cost model calibrated to a device: the roofline's form, its coefficients fitted to measurements.

`partitioner.cost` predicts from a profile's spec-sheet peaks and two efficiencies. Those miss
measured times by 2-5x: per-layer and per-request overheads, kernels that reach a different share
of peak at each size, attention that grows with the square of the prompt. Here the same terms
become features of a linear model whose coefficients are fitted per device, model, precision and
engine (`device_profiles.Calibration`):

    one layer's prefill of L tokens = p0 + p1 x matmul GFLOP(L) + p2 x attention GFLOP(L)
    one decode step at context c    = d0 + d1 x weight MB read + d2 x KV MB read(c)

The fit is few-shot in the spirit of HELP: the profile's analytic roofline is the prior, and a ridge
term pulls each coefficient towards it, so that 8 samples (four prefill lengths and four context
lengths) fix a device the model has never seen. Each sample's error counts relative to its size
(what a percentage error target asks for), and coefficients stay non-negative (a negative cost per
FLOP would predict a long prompt faster than a short one).

Online, the hub corrects a calibration with what agents measure (`OnlineAffine`: recursive least
squares with forgetting of measured = a + b x predicted per kind, so that a fixed cost per request
the calibration missed is learnt as such; `OnlineGain`, the one-gain correction it replaced, stays
as the reference it is compared with) and admits on a high quantile of measured-over-predicted
ratios (`RatioQuantile`), not on the mean. Pure Python: the hub imports this.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from device_profiles import Calibration, DeviceProfile, Sample
from partitioner.cost import ModelCost

PREFILL_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)
"""Prompt lengths the profiler measures prefill at (tokens)."""
DECODE_GRID = (64, 128, 256, 512, 1024, 2048, 4096)
"""Context lengths the profiler measures a decode step at (positions)."""
QUICK_PREFILL = (32, 256, 1024, 2048)
"""The four prompt lengths a quick calibration measures (8 samples in all with QUICK_DECODE)."""
QUICK_DECODE = (64, 512, 2048, 4096)
"""The four context lengths a quick calibration measures."""
RIDGE = 1e-3
"""Weight of the pull towards the analytic prior, relative to one sample's squared relative error."""


# -- features: the roofline's terms ---------------------------------------------------------------


def prefill_features(cost: ModelCost, tokens: float) -> tuple[float, float, float]:
    """(1, matmul GFLOP, attention GFLOP) of one layer prefilling `tokens` tokens (causal: token t
    attends to t + 1 keys; the attention term is the mean over the layers, sliding ones capped)."""
    matmul = 2.0 * cost.layer_matmul_params * tokens
    attention = 4.0 * cost.attn_width * cost.prompt_keys(tokens) / cost.n_layers
    return (1.0, matmul / 1e9, attention / 1e9)


def decode_features(cost: ModelCost, context: float) -> tuple[float, float, float]:
    """(1, weight MB, KV MB) one decode step reads at `context` positions."""
    kv = cost.kv_bytes_per_token * cost.keys_read(context) / cost.n_layers  # sliding layers read their window
    return (1.0, cost.weight_bytes_per_token / 1e6, kv / 1e6)


def prior(profile: DeviceProfile) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The analytic roofline as coefficients: ms per GFLOP at the profile's compute x prefill
    efficiency (TFLOPS = GFLOP per ms), ms per MB at its bandwidth x decode efficiency (GB/s = MB per
    ms), no fixed overheads."""
    per_gflop = 1.0 / (profile.compute_tflops * profile.efficiency.prefill)
    per_mb = 1.0 / (profile.memory_bandwidth_gbs * profile.efficiency.decode)
    return (0.0, per_gflop, per_gflop), (0.0, per_mb, per_mb)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def layer_prefill_ms(cal: Calibration, cost: ModelCost, tokens: float) -> float:
    """One layer's prefill of `tokens` tokens, as calibrated."""
    return _dot(cal.prefill, prefill_features(cost, tokens))


def prefill_ms(cal: Calibration, cost: ModelCost, tokens: float, layers: int | None = None) -> float:
    """Prefill of `tokens` tokens through `layers` layers (all by default) and the head."""
    n = cost.n_layers if layers is None else layers
    return n * layer_prefill_ms(cal, cost, tokens) + cal.head_ms


def decode_ms(cal: Calibration, cost: ModelCost, context: float) -> float:
    """One decode step (every layer and the head) attending to `context` positions, as calibrated."""
    return _dot(cal.decode, decode_features(cost, context))


# -- the few-sample fit ---------------------------------------------------------------------------


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b, by Gaussian elimination with partial pivoting (a is small and well posed: the
    ridge term keeps it positive definite)."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if m[col][col] == 0:
            raise ValueError("singular system")
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit_linear(
    rows: Sequence[Sequence[float]], ys: Sequence[float], prior_coef: Sequence[float], ridge: float = RIDGE
) -> tuple[float, ...]:
    """Non-negative coefficients minimising sum((y - x.c) / y)^2 + ridge x sum(((c - prior) / s)^2).

    Each coefficient's scale s is what its feature contributes at the samples' mean (so the pull is
    alike for a coefficient in ms and one in ms per GFLOP); a coefficient the unconstrained fit drives
    negative is fixed at 0 and the rest refitted (an active set over at most three terms)."""
    k = len(prior_coef)
    if not rows:
        return tuple(prior_coef)
    mean_y = sum(ys) / len(ys)
    scale = []
    for j in range(k):
        mean_x = sum(abs(r[j]) for r in rows) / len(rows)
        scale.append(mean_y / mean_x if mean_x > 0 else 1.0)
    free = list(range(k))
    coef = [0.0] * k
    while free:
        a = [[0.0] * len(free) for _ in free]
        b = [0.0] * len(free)
        for r, y in zip(rows, ys, strict=True):
            w = 1.0 / (y * y)
            for i, fi in enumerate(free):
                b[i] += w * r[fi] * y
                for j, fj in enumerate(free):
                    a[i][j] += w * r[fi] * r[fj]
        for i, fi in enumerate(free):
            lam = ridge / (scale[fi] * scale[fi])
            a[i][i] += lam
            b[i] += lam * prior_coef[fi]
        sol = _solve(a, b)
        negative = [fi for fi, v in zip(free, sol, strict=True) if v < 0]
        if not negative:
            coef = [0.0] * k
            for fi, v in zip(free, sol, strict=True):
                coef[fi] = v
            break
        free = [fi for fi in free if fi not in negative]
    return tuple(coef)


def fit(
    samples: Iterable[Sample],
    profile: DeviceProfile,
    cost: ModelCost,
    model: str,
    quant: str,
    engine: str,
    power_w: float = 0.0,
    power_sensor: str = "",
) -> Calibration:
    """Calibrate `cost` on the device `profile` describes from its measured `samples` (any kinds;
    four prefill and four decode samples suffice). Kinds without samples keep the analytic prior
    (head and request overheads: 0). Raises device_profiles.CalibrationError for an invalid sample
    (samples validate themselves) and ValueError when there is no prefill or no decode sample."""
    samples = tuple(samples)
    by_kind: dict[str, list[Sample]] = collections.defaultdict(list)
    for s in samples:
        by_kind[s.kind].append(s)
    if not by_kind["prefill"] or not by_kind["decode"]:
        raise ValueError("a calibration needs at least one prefill and one decode sample")
    p_prior, d_prior = prior(profile)
    p = fit_linear(
        [prefill_features(cost, s.tokens) for s in by_kind["prefill"]], [s.ms for s in by_kind["prefill"]], p_prior
    )
    d = fit_linear(
        [decode_features(cost, s.tokens) for s in by_kind["decode"]], [s.ms for s in by_kind["decode"]], d_prior
    )
    head = _median([s.ms for s in by_kind["head"]]) if by_kind["head"] else 0.0
    request = _median([s.ms for s in by_kind["request"]]) if by_kind["request"] else 0.0
    return Calibration(model, quant, engine, p, d, head, request, power_w, power_sensor, samples)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentage_errors(pairs: Iterable[tuple[float, float]]) -> list[float]:
    """|predicted - measured| / measured, in percent, for (measured, predicted) pairs."""
    return [100.0 * abs(p - m) / m for m, p in pairs]


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of xs (linear between order statistics). Raises ValueError on an empty xs."""
    if not xs:
        raise ValueError("quantile of nothing")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- online correction ------------------------------------------------------------------------------


@dataclass
class OnlineGain:
    """One multiplicative correction of a prediction, refitted with every measurement.

    Recursive least squares of y = g x yhat with forgetting factor `forget`, each observation
    weighted by 1 / yhat^2 so that a long request and a short one count alike: g is then the
    exponentially weighted mean of measured / predicted, starting from 1 (the calibration is right)
    with the weight of `prior_weight` observations: half of one, since a calibration timed alone on
    the host misses what serving costs beside the other processes (the work channel, the hub), and
    the first request served says so. A device that slows down 2x is predicted within
    15% of its new speed after about ten requests at the default forgetting of 0.8."""

    forget: float = 0.8
    prior_weight: float = 0.5
    num: float = 0.0
    den: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.forget <= 1:
            raise ValueError(f"forget must be in (0, 1], got {self.forget}")
        if self.den == 0:
            self.num = self.den = self.prior_weight

    @property
    def gain(self) -> float:
        return self.num / self.den

    def update(self, predicted: float, measured: float) -> float:
        """Take one measurement of what `predicted` (uncorrected) forecast; returns the new gain.
        Non-positive or non-finite values are ignored (a request that produced nothing)."""
        if predicted > 0 and measured > 0 and math.isfinite(predicted) and math.isfinite(measured):
            self.num = self.forget * self.num + measured / predicted
            self.den = self.forget * self.den + 1.0
        return self.gain


MIN_RATIO = 0.2
"""A corrected prediction is never below this share of the calibrated one. It guards a negative
intercept extrapolated to a request much shorter than those it was fitted on (a + b x would reach
0); a calibration (or roofline) 5x slower than the device has not been measured, while a device
slowing down has no ceiling."""


@dataclass(frozen=True)
class Affine:
    """A correction of a calibrated prediction x (ms): max(MIN_RATIO x, a + b x)."""

    a: float = 0.0
    """Fixed cost per request the calibration misses, ms (negative: one it counts too much)."""
    b: float = 1.0
    """Gain on what the calibration predicts (1: it holds)."""

    def apply(self, predicted: float) -> float:
        return max(MIN_RATIO * predicted, self.a + self.b * predicted)


@dataclass
class OnlineAffine:
    """measured ~ a + b x predicted, refitted with every measurement.

    Recursive least squares with forgetting factor `forget`, in relative terms: each observation
    weighted by 1 / predicted^2, i.e. a fit of the ratio r = measured / predicted = b + a u with
    u = 1 / predicted, so that a short request and a long one count alike. Serving beside the hub
    and other agents adds a fixed cost per request that a calibration timed alone misses (short
    prompts measured up to ~30% over their prediction, 1,000-token ones ~20% under): one gain cannot
    remove a bias that depends on length, an intercept can.

    Priors: b starts at 1 (the calibration holds) with the weight of `prior_weight` observations,
    decaying with the forgetting as OnlineGain's does. `a` has a ridge towards 0 that does not decay:
    `ridge` observations saying "no intercept", in units of the recent requests' size (the penalty is
    ridge x mean(u^2) x a^2, dimensionless like the data's). Where recent requests span sizes (the
    data's weight on `a`, w x var(u), against ridge x mean(u^2)) the ridge is negligible; where they
    all have one size `a` is not identified and the ridge turns the fit into a gain (a -> 0,
    b -> the mean ratio) instead of a singular system.

    `forget` 0.8, OnlineGain's: after a change of speed the old one keeps 0.8^n of the weight, so a
    device that slows down 2x (a and b both double) is predicted about 5% low after ten requests of
    sizes spread over 16..1,024 tokens, the shortest size (which only the few short requests fix)
    within 15%. Steady-state accuracy hardly depends on it (0.7..0.9 give the same median error on
    a synthetic stream with 5-30% noise), so the faster recovery wins. `ridge` 0.1: on requests of
    one size +-6% it keeps `a` within ~4% of their prediction; on prefill of mixed sizes it costs
    nothing measurable, and on decode steps (predictions spread only 1.6x over contexts 16..1,024)
    it still lets the intercept through, where 0.3 makes the fit a gain.
    The state is six plain floats (`state`, `from_state`)."""

    forget: float = 0.8
    prior_weight: float = 0.5
    ridge: float = 0.1
    # Exponentially weighted sums over the observations (u = 1/predicted, r = measured/predicted).
    w: float = 0.0
    """Weight of the data (without b's prior)."""
    suu: float = 0.0
    su: float = 0.0
    sur: float = 0.0
    s1: float = 0.0
    """Weight of the data and of b's prior."""
    sr: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.forget <= 1:
            raise ValueError(f"forget must be in (0, 1], got {self.forget}")
        if self.ridge <= 0 or self.prior_weight <= 0:
            raise ValueError(f"ridge and prior_weight must be > 0, got {self.ridge}, {self.prior_weight}")
        if self.s1 == 0:
            self.s1 = self.sr = self.prior_weight  # b's prior: an observation of r = 1 at u = 0

    @property
    def affine(self) -> Affine:
        """The current (a, b): the normal equations of the weighted ratios, b's prior and a's ridge."""
        if self.w <= 0:
            return Affine(0.0, self.sr / self.s1)
        auu = self.suu * (1 + self.ridge / self.w)  # suu + ridge x mean(u^2)
        det = auu * self.s1 - self.su * self.su  # > 0: suu s1 >= su^2 (Cauchy-Schwarz) and the ridge
        return Affine((self.sur * self.s1 - self.su * self.sr) / det, (auu * self.sr - self.su * self.sur) / det)

    def correct(self, predicted: float) -> float:
        """`predicted` (uncorrected) as corrected now."""
        return self.affine.apply(predicted)

    def update(self, predicted: float, measured: float) -> Affine:
        """Take one measurement of what `predicted` (uncorrected) forecast; returns the new (a, b).
        Non-positive or non-finite values are ignored (a request that produced nothing)."""
        if predicted > 0 and measured > 0 and math.isfinite(predicted) and math.isfinite(measured):
            u, r, f = 1.0 / predicted, measured / predicted, self.forget
            self.w = f * self.w + 1.0
            self.suu = f * self.suu + u * u
            self.su = f * self.su + u
            self.sur = f * self.sur + u * r
            self.s1 = f * self.s1 + 1.0
            self.sr = f * self.sr + r
        return self.affine

    def state(self) -> dict[str, float]:
        """The sums, for a registry (the settings are the defaults')."""
        return {k: getattr(self, k) for k in _AFFINE_STATE}

    @classmethod
    def from_state(cls, state: dict[str, float] | list[float]) -> OnlineAffine:
        """From `state()`'s dict, or from an OnlineGain's [num, den] as stored before (a = 0,
        b = num / den, with the gain's weight). Raises KeyError, TypeError or ValueError for
        anything else."""
        if isinstance(state, list):
            num, den = (float(v) for v in state)
            if not den > 0:
                raise ValueError(f"a stored gain needs a positive weight, got {den}")
            return cls(s1=den, sr=num)
        return cls(**{k: float(state[k]) for k in _AFFINE_STATE})


_AFFINE_STATE = ("w", "suu", "su", "sur", "s1", "sr")


@dataclass
class RatioQuantile:
    """The last `window` ratios of measured over (corrected) predicted time, and their quantiles.

    Admission multiplies a prediction by a high quantile of these, so that a request admitted is
    one that would have fitted its budget on (q x 100)% of recent requests. Until `min_samples`
    ratios are known, `prior` stands in (a new device is trusted a little less than its fit)."""

    window: int = 64
    min_samples: int = 5
    prior: float = 1.25
    ratios: collections.deque[float] | None = None

    def __post_init__(self) -> None:
        if self.ratios is None:
            self.ratios = collections.deque(maxlen=self.window)

    def add(self, predicted: float, measured: float) -> None:
        if predicted > 0 and measured > 0 and math.isfinite(predicted) and math.isfinite(measured):
            self.ratios.append(measured / predicted)  # type: ignore[union-attr]

    def quantile(self, q: float) -> float:
        """The q-quantile of the ratios (never below 1 - what was measured faster is not banked),
        or `prior` while fewer than min_samples are known."""
        r = self.ratios
        assert r is not None
        if len(r) < self.min_samples:
            return self.prior
        return max(1.0, quantile(list(r), q))

    def fraction_within(self, factor: float) -> float:
        """Share of recent ratios at or below `factor` (how often a prediction x factor held)."""
        r = sorted(self.ratios or ())
        return bisect.bisect_right(r, factor) / len(r) if r else 0.0
