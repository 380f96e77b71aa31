"""The Lab's live figures as plain specs: ``Figure`` (what ``gr.Plot`` serialises, without Plotly's validation)
and the layout every panel shares (its title under the label badge, subplot titles, the empty panel)."""

from __future__ import annotations

import json
import math

import plotly.graph_objects as go

from imse.app.theme import TEMPLATE

__all__ = ["Figure", "empty_figure", "layout_spec", "subplot_title"]


class Figure(dict):
    """A Plotly figure as plain JSON-ready data: ``{"data": [...], "layout": {...}}``.

    The live panels are rebuilt several times a second; building them as ``plotly.graph_objects`` (validated
    on every assignment, ~300 ms for the five) cost more than a batch of adaptation. This is the same figure
    spec without the validation: ``to_json`` is what ``gr.Plot`` calls, ``to_plotly`` gives the checked object.
    """

    def to_json(self) -> str:
        layout = {"template": TEMPLATE, **self["layout"]}  # the page-following look (imse.app.theme)
        return json.dumps({"data": self["data"], "layout": layout}, separators=(",", ":"), allow_nan=False)

    def to_plotly(self) -> go.Figure:
        return go.Figure(self["data"], {"template": TEMPLATE, **self["layout"]})

    @property
    def title(self) -> str:
        return self["layout"].get("title", {}).get("text", "")

    @property
    def subtitle(self) -> str:
        return self["layout"].get("title", {}).get("subtitle", {}).get("text", "")


def layout_spec(title: str, height: int, margin: tuple[int, int, int, int], subtitle: str = "", **extra) -> dict:
    """The title pinned to the top, under the app's label badge (32 px), and what a panel draws above its plot
    area (domain names) below it. Gradio's plot makes the top margin at least 100 px: the margins say so."""
    left, right, top, bottom = margin
    title = {"text": title, "y": 1, "yref": "container", "yanchor": "top", "pad": {"t": 32}}
    if subtitle:
        title["subtitle"] = {"text": subtitle}
    return {"title": title, "height": height, "margin": dict(l=left, r=right, t=top, b=bottom), **extra}


def subplot_title(text: str, x: float, anchor: str = "center", y: float = 1.0) -> dict:
    return dict(text=text, x=x, y=y, xref="paper", yref="paper", xanchor=anchor, yanchor="bottom",
                showarrow=False, font=dict(size=14))  # fmt: skip


def empty_figure(title: str, note: str = "press Start") -> Figure:
    annotation = dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    layout = layout_spec(title, 300, (40, 10, 100, 30), annotations=[annotation])
    layout.update(xaxis=dict(visible=False), yaxis=dict(visible=False))
    return Figure(data=[], layout=layout)


# shared by the live panels (imse.app.viz, imse.app.accuracy_panel)
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
MAX_POINTS = 400


def domain_labels(domains: list[dict]) -> list[str]:
    """One bar label per domain visit: a domain seen again (recurring rounds) gets its visit number, since bars
    that share a label would be drawn on top of each other."""
    seen: dict[str, int] = {}
    labels = []
    for domain in domains:
        seen[domain["name"]] = seen.get(domain["name"], 0) + 1
        labels.append(domain["name"] + (f" ({seen[domain['name']]})" if seen[domain["name"]] > 1 else ""))
    return labels


def decimate(n: int) -> list[int]:
    if n <= MAX_POINTS:
        return list(range(n))
    step = n / MAX_POINTS
    return sorted({int(i * step) for i in range(MAX_POINTS)} | {n - 1})


def finite(value: float | None) -> float | None:
    """JSON has no NaN/inf: a non-finite value becomes a gap in the curve."""
    return value if value is not None and math.isfinite(value) else None


def domain_marks(domains: list[dict], xref: str = "x", label: bool = True) -> tuple[list[dict], list[dict]]:
    """Alternate domains shaded, names on top (shapes, annotations)."""
    shapes = [
        dict(type="rect", xref=xref, yref="paper", x0=d["start"] - 0.5, x1=d["end"] + 0.5, y0=0, y1=1,
             fillcolor="grey", opacity=0.12, line_width=0)
        for i, d in enumerate(domains) if i % 2
    ]  # fmt: skip
    annotations = []
    if label and len(domains) <= 30:
        annotations = [
            dict(x=(d["start"] + d["end"]) / 2, y=1.0, xref=xref, yref="paper", text=d["name"].replace("_", " "),
                 showarrow=False, textangle=-60, font=dict(size=8), yanchor="bottom")
            for d in domains
        ]  # fmt: skip
    return shapes, annotations
