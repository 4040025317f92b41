"""Plots as inline SVG, drawn on the server: a heat map, a line chart with a threshold,
two distributions, and grouped bars.

Every label goes through ``html.el`` (escaped); colours are presentation
attributes or classes of the page's one stylesheet, so nothing here needs
script or inline styles. Each ``<svg>`` carries an ``id`` (the tests look for
them) and a ``<title>`` (its accessible name); marks carry ``<title>`` tooltips.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from collector.web.html import Markup, el, num

Series = tuple[str, Sequence[float]]
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 14, 24, 24
_MISSING = "#e5e7eb"
_STOPS = ((0.0, (232, 245, 233)), (1.0, (251, 192, 45)), (2.0, (183, 28, 28)))  # ratio to threshold -> colour


def _f(x: float) -> str:
    return f"{x:.1f}"


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _frame(plot_id: str, title: str, width: int, height: int, *body: Markup) -> Markup:
    return el("svg", el("title", title), *body, id=plot_id, xmlns="http://www.w3.org/2000/svg", role="img",
              viewBox=f"0 0 {width} {height}", width=width, height=height)


def _legend(items: Sequence[tuple[str, str]], x: float = _LEFT) -> list[Markup]:
    """(label, css class) swatches in a row along the top."""
    out = []
    for label, cls in items:
        out.append(el("rect", x=_f(x), y="6", width="10", height="10", class_=cls))
        out.append(el("text", label, x=_f(x + 14), y="15"))
        x += 24 + 6.5 * len(label)
    return out


def _y_axis(lo: float, hi: float, top: float, bottom: float, width: int) -> list[Markup]:
    out = [el("line", x1=_LEFT, y1=_f(top), x2=_LEFT, y2=_f(bottom), class_="axis"),
           el("line", x1=_LEFT, y1=_f(bottom), x2=width - _RIGHT, y2=_f(bottom), class_="axis")]
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        out.append(el("text", num(lo + frac * (hi - lo)), x=_LEFT - 4, y=_f(y + 4), text_anchor="end"))
    return out


def _range(values: Sequence[float], *extra: float) -> tuple[float, float]:
    finite = _finite([*values, *extra])
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    if hi == lo:
        hi = lo + 1.0
    return lo, hi + (hi - lo) * 0.08


def line_chart(plot_id: str, title: str, xs: Sequence[float], series: Sequence[Series], *,
               threshold: float | None = None, marks: Sequence[bool] | None = None,
               x_label: Callable[[float], str] = num, width: int = 420, height: int = 170) -> Markup:
    """Lines over ``xs`` (NaN breaks a line), an optional dashed ``threshold``, and red points
    where ``marks`` is true (on the first series)."""
    top, bottom = _TOP, height - _BOTTOM
    lo, hi = _range([y for _, ys in series for y in ys], *([threshold] if threshold is not None else []))
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    span = (x1 - x0) or 1.0

    def px(x: float) -> float:
        return _LEFT + (x - x0) / span * (width - _LEFT - _RIGHT) if x1 > x0 else (_LEFT + width - _RIGHT) / 2

    def py(y: float) -> float:
        return bottom - (y - lo) / (hi - lo) * (bottom - top)

    body = _y_axis(lo, hi, top, bottom, width)
    legend = [(name, f"s{i % 4}") for i, (name, _) in enumerate(series)]
    if threshold is not None and math.isfinite(threshold):
        body.append(el("line", el("title", f"threshold {num(threshold)}"), x1=_LEFT, x2=width - _RIGHT,
                       y1=_f(py(threshold)), y2=_f(py(threshold)), class_="threshold"))
        legend.append((f"threshold {num(threshold)}", "drifted"))
    for i, (name, ys) in enumerate(series):
        d, pen = [], "M"
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                pen = "M"
                continue
            d.append(f"{pen}{_f(px(x))} {_f(py(y))}")
            pen = "L"
        if d:
            body.append(el("path", d=" ".join(d), class_=f"line s{i % 4}"))
        for j, (x, y) in enumerate(zip(xs, ys)):
            if y is not None and math.isfinite(y):
                hot = i == 0 and marks is not None and j < len(marks) and marks[j]
                body.append(el("circle", el("title", f"{name} {x_label(x)}: {num(y)}"), cx=_f(px(x)),
                               cy=_f(py(y)), r="3.5" if hot else "2", class_="drifted" if hot else f"s{i % 4}"))
    if xs:
        for x, anchor in ((x0, "start"), (x1, "end")):
            body.append(el("text", x_label(x), x=_f(px(x)), y=height - 6, text_anchor=anchor))
    return _frame(plot_id, title, width, height, *_legend(legend), *body)


def _heat(ratio: float) -> str:
    if ratio is None or not math.isfinite(ratio):
        return _MISSING
    r = min(max(ratio, 0.0), _STOPS[-1][0])
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:]):
        if r <= b:
            t = (r - a) / (b - a)
            return "#" + "".join(f"{round(p + (q - p) * t):02x}" for p, q in zip(ca, cb))
    return "#b71c1c"


def heatmap(plot_id: str, title: str, rows: Sequence[str], columns: Sequence[float],
            values: Sequence[Sequence[float]], marked: Sequence[Sequence[bool]], *,
            x_label: Callable[[float], str] = num, width: int = 900, label_width: int = 150,
            cell_height: int = 14) -> Markup:
    """``values[i][j]``: row ``i`` (a column of the model) at time ``columns[j]``, as the ratio of its
    statistic to its threshold (1 = at the threshold; NaN = not evaluated); ``marked``: drifted."""
    n = max(len(columns), 1)
    cell = max(2.0, (width - label_width - _RIGHT) / n)
    width = int(label_width + cell * n + _RIGHT)
    height = _TOP + cell_height * len(rows) + _BOTTOM
    body = []
    for i, name in enumerate(rows):
        y = _TOP + i * cell_height
        body.append(el("text", name[:24], el("title", name), x=label_width - 6, y=_f(y + cell_height - 3),
                       text_anchor="end"))
        for j, at in enumerate(columns):
            v = values[i][j]
            hot = marked[i][j]
            tip = f"{name} at {x_label(at)}: {num(v)} × threshold" + (" — drifted" if hot else "")
            x = label_width + j * cell
            body.append(el("rect", el("title", tip), x=_f(x), y=_f(y), width=_f(cell), height=cell_height,
                           fill=_heat(v)))
            if hot:
                body.append(el("rect", x=_f(x + 1), y=_f(y + 1), width=_f(max(cell - 2, 1)),
                               height=cell_height - 2, class_="cellmark"))
    if columns:
        bottom = height - 6
        body.append(el("text", x_label(columns[0]), x=label_width, y=bottom))
        body.append(el("text", x_label(columns[-1]), x=_f(label_width + cell * n), y=bottom, text_anchor="end"))
    legend, x = [], float(label_width)
    for label, ratio in (("0", 0.0), ("threshold", 1.0), ("2× and more", 2.0), ("not evaluated", math.nan)):
        legend.append(el("rect", x=_f(x), y="6", width="10", height="10", fill=_heat(ratio)))
        legend.append(el("text", label, x=_f(x + 14), y="15"))
        x += 24 + 6.5 * len(label)
    legend.append(el("rect", x=_f(x), y="6", width="10", height="10", fill="#ffffff", class_="cellmark"))
    legend.append(el("text", "drifted", x=_f(x + 14), y="15"))
    return _frame(plot_id, title, width, height, *legend, *body)


def distributions(plot_id: str, title: str, edges: Sequence[float], reference: Sequence[float],
                  current: Sequence[float], *, labels: tuple[str, str] = ("reference", "now"),
                  width: int = 420, height: int = 170) -> Markup:
    """Two histograms over the same ``edges`` (shares per bin): the reference filled, now as a step line."""
    top, bottom = _TOP, height - _BOTTOM
    _, hi = _range([*reference, *current])
    n = len(edges) - 1
    step = (width - _LEFT - _RIGHT) / max(n, 1)

    def py(y: float) -> float:
        return bottom - (y if math.isfinite(y) else 0.0) / hi * (bottom - top)

    body = _y_axis(0.0, hi, top, bottom, width)
    for i, share in enumerate(reference):
        y = py(share)
        body.append(el("rect", el("title", f"{labels[0]} [{num(edges[i])}, {num(edges[i + 1])}): {num(share)}"),
                       x=_f(_LEFT + i * step), y=_f(y), width=_f(step), height=_f(bottom - y), class_="ref"))
    d = [f"M{_LEFT} {_f(bottom)}"]
    for i, share in enumerate(current):
        d.append(f"L{_f(_LEFT + i * step)} {_f(py(share))} L{_f(_LEFT + (i + 1) * step)} {_f(py(share))}")
    d.append(f"L{_f(_LEFT + n * step)} {_f(bottom)}")
    body.append(el("path", el("title", f"{labels[1]}: " + ", ".join(num(s) for s in current)), d=" ".join(d),
                   class_="cur"))
    if n > 0:
        body.append(el("text", num(edges[0]), x=_LEFT, y=height - 6))
        body.append(el("text", num(edges[-1]), x=_f(_LEFT + n * step), y=height - 6, text_anchor="end"))
    return _frame(plot_id, title, width, height, *_legend([(labels[0], "ref"), (labels[1], "cur")]), *body)


def bars(plot_id: str, title: str, categories: Sequence[str], groups: Sequence[Series], *,
         classes: Sequence[str] = ("s0", "s1", "s2", "s3"), width: int = 420, height: int = 180) -> Markup:
    """Grouped bars: one group of ``len(groups)`` bars per category, group ``g`` drawn in ``classes[g]``."""
    top, bottom = _TOP, height - _BOTTOM
    lo, hi = _range([v for _, vs in groups for v in vs])
    slot = (width - _LEFT - _RIGHT) / max(len(categories), 1)
    bar = slot * 0.8 / max(len(groups), 1)

    def py(y: float) -> float:
        return bottom - (y - lo) / (hi - lo) * (bottom - top)

    body = _y_axis(lo, hi, top, bottom, width)
    for c, category in enumerate(categories):
        for g, (name, values) in enumerate(groups):
            v = values[c] if c < len(values) else math.nan
            v = v if v is not None and math.isfinite(v) else 0.0
            y0, y1 = sorted((py(0.0), py(v)))  # bars grow from zero, up or down
            body.append(el("rect", el("title", f"{category} · {name}: {num(v)}"),
                           x=_f(_LEFT + c * slot + slot * 0.1 + g * bar), y=_f(y0), width=_f(bar),
                           height=_f(max(y1 - y0, 0.5)), class_=classes[g % len(classes)]))
        body.append(el("text", category[:14], el("title", category), x=_f(_LEFT + (c + 0.5) * slot),
                       y=height - 6, text_anchor="middle"))
    legend = [(name, classes[g % len(classes)]) for g, (name, _) in enumerate(groups)]
    return _frame(plot_id, title, width, height, *_legend(legend), *body)
