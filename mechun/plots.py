"""Every figure mechun draws, in one place: one palette, integer layer axes, error bars where there are seeds.

Each function takes plain results (lists, dicts, :class:`mechun.stats.SeedStat`) and returns a
``plotly.graph_objects.Figure``; analyses, the depth card and notebooks compose these instead of building figures by
hand, so a layer axis never shows a tick at 0.5 and "mean ± std" always looks the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from mechun.stats import SeedStat

#: One colour per series, in order (colour-blind-safe, Okabe–Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
TEMPLATE = "plotly_white"

Num = float | int  # an int is a fine axis value; the runtime type checker does not apply PEP 484's numeric tower
Series = Sequence[Num] | Sequence[SeedStat]


def _values(series: Series) -> tuple[list[float], list[float] | None]:
    """Means and (for seed statistics) standard deviations of a series."""
    if series and isinstance(series[0], SeedStat):
        return [s.mean for s in series], [s.std for s in series]  # type: ignore[union-attr]
    return [float(v) for v in series], None  # type: ignore[arg-type]


def _style(fig: go.Figure, title: str, x_title: str, y_title: str, y_range: Sequence[Num] | None = None
           ) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template=TEMPLATE, colorway=PALETTE,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0))
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    return fig


def _marks(fig: go.Figure, hline: Num | None, hline_label: str, vline: Num | None, vline_label: str) -> None:
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", annotation_text=hline_label, annotation_position="top left")
    if vline is not None:
        fig.add_vline(x=vline, line_dash="dot", annotation_text=vline_label)


def layer_lines(series: Mapping[str, Series], title: str, y_title: str, *, hline: Num | None = None,
                hline_label: str = "chance", vline: int | None = None, vline_label: str = "",
                dashed: Sequence[str] = (), y_range: Sequence[Num] | None = None) -> go.Figure:
    """One line per named series over layers ``0..L-1`` (integer ticks); seed statistics get error bars.

    ``dashed`` names series drawn dashed (e.g. a base-model reference)."""
    fig = go.Figure()
    n = 0
    for name, s in series.items():
        y, err = _values(s)
        n = max(n, len(y))
        fig.add_scatter(x=list(range(len(y))), y=y, name=name, mode="lines+markers",
                        error_y=dict(type="data", array=err, visible=True) if err is not None else None,
                        line=dict(dash="dash") if name in dashed else None)
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=1, range=[-0.5, max(n, 1) - 0.5])
    _marks(fig, hline, hline_label, vline, vline_label)
    return _style(fig, title, "layer", y_title, y_range)


def step_lines(steps: Sequence[int], series: Mapping[str, Series], title: str, y_title: str, *,
               x_title: str = "step", hline: Num | None = None, hline_label: str = "chance",
               y_range: Sequence[Num] | None = None) -> go.Figure:
    """Curves over training steps (relearning, loss), one per named series; seed statistics get error bars."""
    fig = go.Figure()
    for name, s in series.items():
        y, err = _values(s)
        fig.add_scatter(x=list(steps), y=y, name=name, mode="lines+markers",
                        error_y=dict(type="data", array=err, visible=True) if err is not None else None)
    _marks(fig, hline, hline_label, None, "")
    return _style(fig, title, x_title, y_title, y_range)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Series], title: str, y_title: str, *,
                 hline: Num | None = None, hline_label: str = "chance", y_range: Sequence[Num] | None = None,
                 text: bool = False) -> go.Figure:
    """Grouped bars: one group per entry of ``groups``, one bar per named series; seed statistics get error bars."""
    fig = go.Figure()
    for name, s in series.items():
        y, err = _values(s)
        fig.add_bar(name=name, x=list(groups), y=y,
                    error_y=dict(type="data", array=err, visible=True) if err is not None else None,
                    text=[f"{v:.2f}" for v in y] if text else None, textposition="outside" if text else None)
    fig.update_layout(barmode="group")
    _marks(fig, hline, hline_label, None, "")
    return _style(fig, title, "", y_title, y_range)


def accuracy_bars(accuracy: Mapping[str, Mapping[str, Num]], title: str = "Accuracy by domain and format",
                  chance: Mapping[str, Num] | None = None) -> go.Figure:
    """Grouped bars: one group per domain, one bar per format (``{"domain": {"format": acc}}``)."""
    domains = list(accuracy)
    formats = list(next(iter(accuracy.values())))
    fig = grouped_bars(domains, {f: [accuracy[d][f] for d in domains] for f in formats}, title, "accuracy",
                       y_range=(0, 1.1), text=True)
    for fmt, level in (chance or {}).items():
        fig.add_hline(y=level, line_dash="dot", annotation_text=f"chance ({fmt})", annotation_position="top left")
    return fig


def scatter(points: Mapping[str, tuple[Sequence[Num], Sequence[Num]]], title: str, x_title: str,
            y_title: str, *, labels: Mapping[str, Sequence[str]] | None = None,
            x_range: Sequence[Num] | None = None, y_range: Sequence[Num] | None = None) -> go.Figure:
    """One marker trace per named ``(x, y)`` point set (e.g. forget vs retain accuracy per setting)."""
    fig = go.Figure()
    for name, (x, y) in points.items():
        fig.add_scatter(x=list(x), y=list(y), name=name, mode="markers", marker=dict(size=9),
                        text=list(labels[name]) if labels and name in labels else None)
    if x_range is not None:
        fig.update_xaxes(range=list(x_range))
    return _style(fig, title, x_title, y_title, y_range)


def heatmap(z: Sequence[Sequence[Num]], x: Sequence[str], title: str, *, y_title: str = "layer",
            x_title: str = "position", colorbar: str = "", diverging: bool = True) -> go.Figure:
    """A layers × positions (or layers × heads) score map; rows are layers with integer ticks."""
    fig = go.Figure(go.Heatmap(z=[list(r) for r in z], x=list(x), y=list(range(len(z))),
                               colorscale="RdBu" if diverging else "Viridis", zmid=0 if diverging else None,
                               colorbar=dict(title=colorbar)))
    fig.update_yaxes(tickmode="linear", tick0=0, dtick=1)
    return _style(fig, title, x_title, y_title)


def line(values: Sequence[Num], title: str, x_title: str = "step", y_title: str = "",
         x: Sequence | None = None) -> go.Figure:
    """A single unnamed curve (e.g. a training loss)."""
    fig = go.Figure(go.Scatter(x=list(x) if x is not None else list(range(len(values))), y=list(values),
                               mode="lines"))
    return _style(fig, title, x_title, y_title)


def patching_heatmap(result: Any, title: str, *, colorbar: str = "") -> go.Figure:
    """A patching or causal-tracing result (``.scores`` layers × positions, ``.tokens``, ``.layers``, as
    :class:`mechun.localize.PatchingResult`) as a :func:`heatmap`: one column per token, labelled ``i:token`` so a
    repeated token keeps its own column, and rows at the result's layers."""
    fig = heatmap(result.scores.tolist(), [f"{i}:{t}" for i, t in enumerate(result.tokens)], title,
                  x_title="token", colorbar=colorbar)
    fig.update_traces(y=list(result.layers))
    return fig
