"""Plotly figures. Each function takes plain results (dicts, lists) and returns a ``plotly.graph_objects.Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go


def accuracy_bars(accuracy: Mapping[str, Mapping[str, float]], title: str = "Accuracy by domain and format",
                  chance: Mapping[str, float] | None = None) -> go.Figure:
    """Grouped bars: one group per domain, one bar per format (``{"domain": {"format": acc}}``)."""
    domains = list(accuracy)
    formats = list(next(iter(accuracy.values())))
    fig = go.Figure([go.Bar(name=fmt, x=domains, y=[accuracy[d][fmt] for d in domains],
                            text=[f"{accuracy[d][fmt]:.2f}" for d in domains], textposition="outside")
                     for fmt in formats])
    for fmt, level in (chance or {}).items():
        fig.add_hline(y=level, line_dash="dot", annotation_text=f"chance ({fmt})", annotation_position="top left")
    fig.update_layout(title=title, barmode="group", yaxis=dict(title="accuracy", range=[0, 1.1]),
                      template="plotly_white")
    return fig


def line(values: Sequence[float], title: str, x_title: str = "step", y_title: str = "",
         x: Sequence | None = None) -> go.Figure:
    fig = go.Figure(go.Scatter(x=list(x) if x is not None else list(range(len(values))), y=list(values),
                               mode="lines"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white")
    return fig
