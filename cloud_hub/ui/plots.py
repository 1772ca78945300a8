"""Small SVG line charts, drawn on the server: no charting library, no script, nothing fetched.

Every label is escaped (device names are the devices' own words). Colours are attributes, not
inline styles, so the page's Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

import time

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
W, H = 560, 200
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 46


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / 3 for i in range(4)]


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == 0 else f"{v:.2g}"


class _Frame:
    """A chart's axes over [x0, x1] x [y0, y1] (y from 0 when all are positive, 10% headroom above):
    the title, horizontal grid lines with their values, and the scale functions."""

    def __init__(self, title: str, xs: list[float], ys: list[float]) -> None:
        x0, x1, y0, y1 = min(xs), max(xs), min(0.0, min(ys)), max(ys)
        self.x0, self.y0 = x0, y0
        self.x1, self.y1 = (x1 if x1 > x0 else x0 + 1), (y1 * 1.1 if y1 > y0 else y0 + 1)
        self.out = [_head(title)]
        for v in _ticks(self.y0, self.y1):
            y = self.sy(v)
            self.out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
            self.out.append(
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#374151">{_num(v)}</text>'
            )

    def sx(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def sy(self, y: float) -> float:
        ph = H - TOP - BOTTOM
        return TOP + ph - (y - self.y0) / (self.y1 - self.y0) * ph


def _head(title: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}" '
        f'xmlns="http://www.w3.org/2000/svg"><text x="{LEFT}" y="16" font-size="13" font-weight="600" '
        f'fill="#111827">{escape(title)}</text>'
    )


def line_chart(title: str, unit: str, data: dict[str, list[tuple[float, float]]], zero_line: bool = False) -> Markup:
    """One chart: a line per series (label -> [(unix time, value)], oldest first), time across."""
    title = f"{title} ({unit})"
    points = [p for pts in data.values() for p in pts]
    if not points:
        return Markup(
            _head(title) + f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#6b7280" '
            'font-size="12">no requests yet</text></svg>'
        )
    frame = _Frame(title, [p[0] for p in points], [p[1] for p in points])
    sx, sy, out, ph = frame.sx, frame.sy, frame.out, H - TOP - BOTTOM
    x0, x1, y0 = frame.x0, frame.x1, frame.y0
    if zero_line and y0 < 0:
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(0):.1f}" y2="{sy(0):.1f}" stroke="#9ca3af"/>')
    for v, anchor in ((x0, "start"), (x1, "end")):
        out.append(
            f'<text x="{sx(v):.1f}" y="{TOP + ph + 16}" text-anchor="{anchor}" font-size="11" '
            f'fill="#374151">{time.strftime("%H:%M:%S", time.localtime(v))}</text>'
        )
    legend_x = LEFT
    for i, (label, pts) in enumerate(sorted(data.items())):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}"/>' for x, y in pts[-60:]]
        text = label if len(label) <= 24 else label[:23] + "…"
        out.append(
            f'<rect x="{legend_x}" y="{H - 16}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{H - 7}" font-size="11" fill="#111827">{escape(text)}</text>'
        )
        legend_x += 24 + 7 * len(text)
        if legend_x > W - 60:
            break
    out.append("</svg>")
    return Markup("".join(out))


def front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point beats on both coordinates (both minimised): the Pareto front."""
    return [not any(a2 <= a and b2 <= b and (a2, b2) != (a, b) for a2, b2 in points) for a, b in points]


def scatter(title: str, x_unit: str, y_unit: str, points: list[tuple[str, float, float]], marked: str = "") -> Markup:
    """Labelled points (label, x, y), the Pareto front (least x and y) filled and joined, the rest hollow;
    the point labelled `marked` ringed in red."""
    if not points:
        return Markup(_head(title) + "</svg>")
    frame = _Frame(f"{title} ({y_unit} against {x_unit})", [p[1] for p in points], [p[2] for p in points])
    sx, sy, out, ph = frame.sx, frame.sy, frame.out, H - TOP - BOTTOM
    for v in _ticks(frame.x0, frame.x1):
        out.append(f'<text x="{sx(v):.1f}" y="{TOP + ph + 16}" text-anchor="middle" font-size="11" '
                   f'fill="#374151">{_num(v)}</text>')  # fmt: skip
    out.append(f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end" font-size="11" fill="#374151">'
               f"{escape(x_unit)} →</text>")  # fmt: skip
    on = front([(x, y) for _, x, y in points])
    line = sorted((x, y) for (_, x, y), f in zip(points, on, strict=True) if f)
    out.append('<polyline points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
               + '" fill="none" stroke="#2563eb" stroke-width="1.5"/>')  # fmt: skip
    for (label, x, y), f in zip(points, on, strict=True):
        fill = "#2563eb" if f else "#ffffff"
        out.append(f'<circle class="{"front" if f else "behind"}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" '
                   f'fill="{fill}" stroke="#2563eb"><title>{escape(label)}</title></circle>')  # fmt: skip
        if label == marked:
            out.append(f'<circle class="marked" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="7" fill="none" stroke="#dc2626" '
                       'stroke-width="2"/>')  # fmt: skip
    out.append("</svg>")
    return Markup("".join(out))
