"""The run's loss curve as a small SVG line chart, written by hand: importing matplotlib took 0.7 s at the end of
every run, longer than saving the weights of a LoRA run, and a few axes and polylines need none of it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 560, 320  # one panel, in SVG user units (pixels at 100% zoom)
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44  # room for tick labels, the title and the x-axis label
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    markers: bool = False  # eval losses: few points, each worth seeing


@dataclass
class Panel:
    title: str
    y_label: str
    series: list[Series] = field(default_factory=list)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not high > low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil(round((high - first) / step, 6))) + 1)]


def tick_label(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"


def finite(series: list[Series]) -> list[Series]:
    return [Series(s.label, [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)], s.markers)
            for s in series]


def panel_svg(panel: Panel, left_edge: float) -> list[str]:
    """One panel's axes, grid, ticks, lines and legend, its left edge at x = left_edge."""
    series = [s for s in finite(panel.series) if s.points]
    xs = [x for s in series for x, _ in s.points] or [0.0, 1.0]
    ys = [y for s in series for _, y in s.points] or [0.0, 1.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (left_edge + LEFT + (x - x0) / (x1 - x0) * plot_w, TOP + plot_h - (y - y0) / (y1 - y0) * plot_h)

    out = [f'<text x="{left_edge + WIDTH / 2}" y="18" text-anchor="middle" font-weight="bold">'
           f'{escape(panel.title)}</text>']
    for x in x_ticks:
        px, _ = at(x, y0)
        out.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{TOP + plot_h}" stroke="#ddd"/>')
        out.append(f'<text x="{px:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{tick_label(x)}</text>')
    for y in y_ticks:
        _, py = at(x0, y)
        out.append(f'<line x1="{left_edge + LEFT}" y1="{py:.1f}" x2="{left_edge + LEFT + plot_w}" y2="{py:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left_edge + LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    out.append(f'<rect x="{left_edge + LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#444"/>')
    out.append(f'<text x="{left_edge + LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle">step</text>')
    out.append(f'<text transform="translate({left_edge + 14},{TOP + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(panel.y_label)}</text>')
    if series:  # legend in the top-right corner, on white so lines under it do not cross the labels
        out.append(f'<rect x="{left_edge + WIDTH - RIGHT - 156}" y="{TOP + 2}" width="152" '
                   f'height="{16 * len(series) + 6}" fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in line.points))
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if line.markers or len(line.points) == 1:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>'
                    for px, py in (at(x, y) for x, y in line.points)]
        ly = TOP + 14 + 16 * index
        out.append(f'<line x1="{left_edge + WIDTH - RIGHT - 150}" y1="{ly - 4}" x2="{left_edge + WIDTH - RIGHT - 130}"'
                   f' y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left_edge + WIDTH - RIGHT - 125}" y="{ly}">{escape(line.label)}</text>')
    return out


def chart_svg(panels: list[Panel]) -> str:
    """Panels side by side in one SVG document."""
    body = [line for index, panel in enumerate(panels) for line in panel_svg(panel, index * WIDTH)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH * len(panels)}" height="{HEIGHT}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
