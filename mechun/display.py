"""Rich display in Jupyter: the ``_repr_html_`` of mechun's result objects.

Each repr is a compact table with, where it helps, a small chart drawn as inline SVG: no JavaScript and nothing
fetched, so it renders the same in JupyterLab, VS Code, an exported HTML page and a notebook viewer, and a committed
notebook stays small (a plotly figure would embed plotly.js, 3.5 MB, in every output). The interactive plotly
figure of each object is one call away (``mechun.plots``); the repr names it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["frame", "short_repr", "svg_heatmap", "svg_lines"]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
_STYLE = ("font-family:system-ui,sans-serif;font-size:12px;border:1px solid #ddd;border-radius:4px;padding:6px 10px;"
          "display:inline-block;max-width:100%")


def table(rows: Sequence[Mapping[str, Any]], digits: int = 3) -> str:
    """The report's table (:func:`mechun.report.table`) with compact inline cell styles; empty for no rows."""
    from mechun.report import table as report_table

    return report_table(rows, digits, "padding:1px 8px;text-align:right;border-bottom:1px solid #eee") if rows else ""


def frame(title: str, *parts: str, hint: str = "") -> str:
    """One bordered block: a bold title, the parts, and a grey hint line (e.g. which call plots it)."""
    foot = f"<div style='color:#777;margin-top:4px'>{html.escape(hint)}</div>" if hint else ""
    return f"<div style='{_STYLE}'><b>{html.escape(title)}</b>{''.join(parts)}{foot}</div>"


def short_repr(name: str, **fields: Any) -> str:
    """``Name(a=1, b=[0.12, 0.5])``: the one-line ``repr`` of a result object, floats rounded, no tensor dumps (what a
    terminal and a notebook's plain-text fallback show)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, list | tuple) and all(isinstance(x, float) for x in v):
            return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)
    return f"{name}(" + ", ".join(f"{k}={fmt(v)}" for k, v in fields.items()) + ")"


def _tick(v: float) -> str:
    """A short axis number; values within 1e-6 of 0 print as 0."""
    return "0" if abs(v) < 1e-6 else f"{v:.3g}"


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def svg_lines(series: Mapping[str, Sequence[float]], x_label: str = "layer", y_label: str = "",
              hline: float | None = None, width: int = 340, height: int = 140) -> str:
    """Small line chart over ``0..n-1`` (one line per series, a legend, min/max y ticks, an optional dashed
    reference line)."""
    values = [v for s in series.values() for v in _finite(s)] + ([hline] if hline is not None else [])
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(s) for s in series.values())
    left, right, top, bottom = 42, 8, 8, 30
    w, h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (i / (n - 1) * w if n > 1 else w / 2)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * h

    parts = [f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#ccc'/>",
             f"<text x='{left - 4}' y='{top + 9}' text-anchor='end'>{_tick(hi)}</text>",
             f"<text x='{left - 4}' y='{top + h}' text-anchor='end'>{_tick(lo)}</text>",
             f"<text x='{left}' y='{height - 16}'>0</text>",
             f"<text x='{left + w}' y='{height - 16}' text-anchor='end'>{n - 1}</text>",
             f"<text x='{left + w / 2}' y='{height - 16}' text-anchor='middle'>{html.escape(x_label)}</text>"]
    if y_label:
        parts.append(f"<text x='10' y='{top + h / 2}' transform='rotate(-90 10 {top + h / 2})' "
                     f"text-anchor='middle'>{html.escape(y_label)}</text>")
    if hline is not None:
        parts.append(f"<line x1='{left}' x2='{left + w}' y1='{y(hline):.1f}' y2='{y(hline):.1f}' stroke='#999' "
                     "stroke-dasharray='3,3'/>")
    legend_x = left
    for k, (name, s) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        pts = [(x(i), y(float(v))) for i, v in enumerate(s) if v is not None and math.isfinite(float(v))]
        if len(pts) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            parts.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.8'/>")
        parts += [f"<circle cx='{px:.1f}' cy='{py:.1f}' r='2.2' fill='{color}'/>" for px, py in pts]
        parts.append(f"<text x='{legend_x}' y='{height - 3}' fill='{color}'>{html.escape(name)}</text>")
        legend_x += 8 + 6.5 * len(name)
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"style='font-size:10px;display:block'>{''.join(parts)}</svg>")


def svg_heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
                cell: int = 22, max_width: int = 640) -> str:
    """Small heatmap (white = the minimum, dark blue = the maximum), row and column labels, each cell's value
    as a tooltip."""
    values = [v for row in matrix for v in _finite(row)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo if hi - lo > 1e-12 else 1.0
    n_cols = max(len(r) for r in matrix)
    left, top = 34, 4
    cell = max(8, min(cell, (max_width - left) // max(n_cols, 1)))
    parts = []
    for i, row in enumerate(matrix):
        parts.append(f"<text x='{left - 4}' y='{top + i * cell + cell * 0.7:.1f}' text-anchor='end'>"
                     f"{html.escape(str(row_labels[i]))}</text>")
        for j, v in enumerate(row):
            t = (float(v) - lo) / span if math.isfinite(float(v)) else 0.0
            r, g, b = (int(255 - t * (255 - c)) for c in (8, 48, 107))
            parts.append(f"<rect x='{left + j * cell}' y='{top + i * cell}' width='{cell}' height='{cell}' "
                         f"fill='rgb({r},{g},{b})'><title>{html.escape(str(row_labels[i]))}, "
                         f"{html.escape(str(col_labels[j]))}: {float(v):.3g}</title></rect>")
    bottom = top + len(matrix) * cell
    for j, label in enumerate(col_labels):
        cx = left + j * cell + cell / 2
        parts.append(f"<text x='{cx:.1f}' y='{bottom + 4}' transform='rotate(45 {cx:.1f} {bottom + 4})' "
                     f"font-size='9'>{html.escape(str(label)[:18])}</text>")
    width, height = left + n_cols * cell + 40, bottom + 60
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"style='font-size:10px;display:block'>{''.join(parts)}</svg>"
            f"<div style='color:#555'>colour: {_tick(lo)} (white) to {_tick(hi)} (blue)</div>")
