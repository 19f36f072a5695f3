"""One self-contained HTML report per analysis: headings, prose, tables and plotly figures, plotly.js inlined once."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from mechun.io import write_text

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f4f4f4}pre{background:#f7f7f7;padding:1em;overflow-x:auto}.verdict{font-size:1.1em;
background:#eef6ee;border-left:4px solid #4a4;padding:.6em 1em}"""


def table(rows: Sequence[Mapping[str, Any]], digits: int = 3, cell_style: str = "") -> str:
    """An HTML table from a list of dicts (keys of the first row are the columns); ``cell_style`` is inlined into
    every cell (notebook displays carry their own style, a report page has its stylesheet)."""
    if not rows:
        return "<p>(no rows)</p>"
    cols = list(rows[0])
    style = f" style='{cell_style}'" if cell_style else ""

    def fmt(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th{style}>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td{style}>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table style='border-collapse:collapse'><tr>{head}</tr>{body}</table>"


def write_report(path: str | Path, title: str, blocks: Sequence[str | go.Figure | tuple[str, str]],
                 results: Mapping[str, Any] | None = None, results_name: str = "results.json") -> Path:
    """Write ``blocks`` (HTML strings, figures, or ("h2", text) headings) as one page; plotly.js is embedded."""
    parts, js_done = [], False
    for block in blocks:
        if isinstance(block, go.Figure):
            parts.append(block.to_html(full_html=False, include_plotlyjs=not js_done))
            js_done = True
        elif isinstance(block, tuple):
            tag, text = block
            parts.append(f"<{tag}>{html.escape(text)}</{tag}>")
        else:
            parts.append(block)
    if results is not None:
        parts.append(f"<h2>{html.escape(results_name)}</h2><pre>" + html.escape(json.dumps(results, indent=1)[:20000]) + "</pre>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")
    return write_text(path, page)
