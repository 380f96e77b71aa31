"""The Teach tab's view 4 figures: the KL between domains, their 2-D map and retrieval's KL to each bank slot.

The map's labels are placed so that none overlaps another label or a point (``place_labels``), and the map says
what it is: classical MDS of √KL, an approximation; retrieval reads the KL itself, which the bar chart shows.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from imse.app.teach_viz import _MARGIN, _themed, log_ticks
from imse.app.theme import NEUTRAL
from imse.runs.explain.domains import CLEAN, DomainMap, Retrieval

__all__ = ["domain_map_figure", "kl_figure", "place_labels", "retrieval_figure"]

CHAR_PX, LINE_PX, POINT_PX = 7.0, 14.0, 10.0  # a label's character width and height, a point's radius (12 px font)
MINOR_FONT = (
    0.75  # the corruptions neither stored nor new: labelled smaller (9 px), after the others, where there is room
)
# where a label's centre may go around its point: 8 directions (the ones above and below first) at growing distances
_DIRECTIONS = [(0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1)]
_DISTANCES = (0, 22, 44)  # px beyond touching the point; further away, a line leads from the label to its point


def _box(
    x: float, y: float, width: float, offset: tuple[float, float], height: float = LINE_PX
) -> tuple[float, float, float, float]:
    """The pixel box of a label ``width`` × ``height`` px centred ``offset`` px from the point (x, y), y up."""
    return (x + offset[0] - width / 2, y + offset[1] - height / 2, x + offset[0] + width / 2,
            y + offset[1] + height / 2)  # fmt: skip


def _offsets(width: float, height: float = LINE_PX) -> list[tuple[float, float]]:
    """Label centres around a point, nearest first: touching it in each direction, then further out."""
    reach_x, reach_y = POINT_PX + width / 2, POINT_PX + height / 2
    return [(dx * (reach_x + extra), dy * (reach_y + extra)) for extra in _DISTANCES for dx, dy in _DIRECTIONS]


def _overlaps(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    points: list[tuple[float, float]],
    labels: list[str],
    px_per_unit: float,
    sizes: list[float] | None = None,
    optional: list[bool] | None = None,
) -> list[tuple[float, float] | None]:
    """Where each label's centre goes, in px from its point (y up; None for an empty label), greedily in order:
    the nearest place whose box meets no label placed so far and no point; the least crowded one when every place
    is taken, except for an ``optional`` label, which then is left out (None). ``sizes``: each label's font size
    relative to 12 px (1 when not given)."""
    pixels = [(x * px_per_unit, y * px_per_unit) for x, y in points]
    dots = [(x - POINT_PX, y - POINT_PX, x + POINT_PX, y + POINT_PX) for x, y in pixels]
    placed: list[tuple] = []
    offsets: list[tuple[float, float] | None] = []
    for (x, y), label, size, spare in zip(
        pixels, labels, sizes or [1.0] * len(labels), optional or [False] * len(labels)
    ):
        if not label:
            offsets.append(None)
            continue
        width, height = CHAR_PX * size * len(label), LINE_PX * size
        crowding = []
        for offset in _offsets(width, height):
            box = _box(x, y, width, offset, height)
            crowding.append((sum(_overlaps(box, other) for other in dots + placed), offset, box))
        crowded, offset, box = min(crowding, key=lambda entry: entry[0])  # the nearest of the least crowded
        if crowded and spare:
            offsets.append(None)
            continue
        offsets.append(offset)
        placed.append(box)
    return offsets


@_themed
def kl_figure(domains: DomainMap):
    """Pairwise symmetric KL between the domains' descriptors; cells over τ (a new domain) marked ●."""
    labels = [name.replace("_", " ") for name in domains.names]
    marks = [["●" if value > domains.tau else "" for value in row] for row in domains.kl]
    fig = go.Figure(
        go.Heatmap(
            z=[[math.log10(max(v, 1e-6)) for v in row] for row in domains.kl],
            x=labels,
            y=labels,
            text=marks,
            texttemplate="%{text}",
            customdata=domains.kl,
            hovertemplate="%{y} ↔ %{x}<br>KL %{customdata:.4f}<extra></extra>",
            colorscale="Viridis",
            colorbar=dict(title="KL", tickvals=list(range(-6, 2)), ticktext=[f"{10.0**e:g}" for e in range(-6, 2)]),
        )
    )
    note = f"● over τ = {domains.tau:g}: detection would call it a new domain"
    fig.update_layout(
        title=dict(text="Symmetric KL between descriptors", subtitle=dict(text=note)),
        height=470,
        margin=dict(l=110, r=15, t=60, b=100),
        yaxis=dict(autorange="reversed"),
    )
    return fig


def _category(name: str, retrieval: Retrieval | None) -> str:
    if name == CLEAN:
        return "clean (slot 0)"
    if retrieval and name in retrieval.stored:
        return "stored in the bank"
    return OTHERS


CIRCLE = "√τ around clean: inside, a stream on clean data would not detect it (approximately)"
OTHERS = "not stored (named where there is room)"
_CATEGORIES = {
    OTHERS: "#1f77b4",
    "stored in the bank": "#d62728",
    "clean (slot 0)": "#2ca02c",
}  # drawn in order


PAD = 0.08  # the map's axes reach this share of the points' extent beyond them, each side


def _padded(values: list[float], share: float = PAD) -> list[float]:
    low, high = min(values), max(values)
    pad = share * max(high - low, 1e-9)
    return [low - pad, high + pad]


def _label_points(fig, domains: DomainMap, retrieval: Retrieval | None, width_px: float) -> None:
    """Name every point where room allows (a screenshot has no hover): clean, the bank (its slot number first, as
    in the retrieval plot) and the new batch placed first, the other corruptions after them in a smaller font; a
    label that had to stand off its point gets a line to it."""
    incoming = retrieval.incoming if retrieval else None
    xs, ys = [p[0] for p in domains.xy], [p[1] for p in domains.xy]
    radius = math.sqrt(domains.tau)
    cx, cy = domains.xy[0]
    span = max(max(xs + [cx + radius]) - min(xs + [cx - radius]), max(ys + [cy + radius]) - min(ys + [cy - radius]))
    stored = list(retrieval.stored) if retrieval else []
    shown = [
        f"{stored.index(name)}: {name.replace('_', ' ')}" if name in stored else name.replace("_", " ")
        for name in domains.names
    ]
    minor = [_category(name, retrieval) == OTHERS and name != incoming for name in domains.names]
    order = sorted(range(len(shown)), key=lambda i: minor[i])
    sizes = [MINOR_FONT if minor[i] else 1.0 for i in order]
    scale = width_px / max(span * (1 + 2 * PAD), 1e-9)
    placed = place_labels([domains.xy[i] for i in order], [shown[i] for i in order], scale, sizes,
                          [minor[i] for i in order])  # fmt: skip
    for i, offset in zip(order, placed):
        if offset is not None:
            size = MINOR_FONT if minor[i] else 1.0
            far = offset not in _offsets(CHAR_PX * size * len(shown[i]), LINE_PX * size)[: len(_DIRECTIONS)]
            fig.add_annotation(x=xs[i], y=ys[i], text=shown[i], showarrow=True, arrowwidth=1 if far else 0.1,
                               arrowcolor=NEUTRAL if far else "rgba(128,128,128,0)", ax=offset[0], ay=-offset[1],
                               standoff=6, font=dict(size=12 * size))  # fmt: skip


@_themed
def domain_map_figure(domains: DomainMap, retrieval: Retrieval | None = None, width_px: float = 250):
    """The domains on a 2-D map (classical MDS: distances ≈ √KL, approximately) with the circle √τ around the
    clean data; every point is labelled (a bank slot's label starts with its number, as in the retrieval plot, so a
    crowded label that stands off its dot still says which kind it is), each kind in the legend.
    ``width_px``: the plot area's width to place the labels apart for (a phone's, measured at 390 px: on a desktop
    they sit further apart)."""
    incoming = retrieval.incoming if retrieval else None
    xs, ys = [p[0] for p in domains.xy], [p[1] for p in domains.xy]
    radius = math.sqrt(domains.tau)
    cx, cy = domains.xy[0]
    fig = go.Figure()
    for category, colour in _CATEGORIES.items():
        members = [i for i, name in enumerate(domains.names) if _category(name, retrieval) == category]
        fig.add_trace(
            go.Scatter(
                x=[xs[i] for i in members],
                y=[ys[i] for i in members],
                mode="markers",
                hovertext=[domains.names[i].replace("_", " ") for i in members],
                hoverinfo="text",
                marker=dict(size=11, color=colour),
                name=category,
            )
        )
    _label_points(fig, domains, retrieval, width_px)
    if incoming is not None:
        at = domains.names.index(incoming)
        fig.add_trace(go.Scatter(x=[xs[at]], y=[ys[at]], mode="markers", hoverinfo="skip",
                                 marker=dict(size=19, color="rgba(0,0,0,0)", line=dict(color=NEUTRAL, width=3)),
                                 name=f"ring: {incoming.replace('_', ' ')}'s point (the new batch: "
                                      "another batch of it)"))  # fmt: skip
    angles = [2 * math.pi * t / 96 for t in range(97)]
    circle_x, circle_y = [cx + radius * math.cos(a) for a in angles], [cy + radius * math.sin(a) for a in angles]
    fig.add_trace(go.Scatter(x=circle_x, y=circle_y, mode="lines", line=dict(color="#2ca02c", width=1.5),
                             hoverinfo="skip", name=CIRCLE))  # fmt: skip
    note = (f"classical MDS: points placed so their distances<br>best match √KL (it keeps {100 * domains.kept:.0f} % "
            "of its variance);<br>retrieval reads the KL, not this map")  # fmt: skip
    fig.update_layout(
        title=dict(text="Domain map (distance ≈ √KL)", subtitle=dict(text=note)),
        height=560,
        margin=dict(l=55, r=15, t=100, b=55),
        # the points' and the circle's extent, fixed: left to autorange, the labels would widen it and shrink the map
        xaxis=dict(
            zeroline=False,
            title="MDS axis 1 (√KL units)",
            constrain="domain",
            range=_padded(xs + [cx - radius, cx + radius]),
        ),
        yaxis=dict(
            zeroline=False,
            title="MDS axis 2 (√KL units)",
            scaleanchor="x",
            constrain="domain",
            range=_padded(ys + [cy - radius, cy + radius]),
        ),  # fmt: skip
        legend=dict(orientation="h", y=-0.08, yanchor="top"),
    )
    return fig


@_themed
def retrieval_figure(retrieval: Retrieval, tau: float):
    """KL from the new batch to every slot of the bank, one dot per slot on a log axis: a dot's height reads its
    value against the axis (a bar's length on a log axis misleads: a 3× smaller bar looked two-thirds as tall; on
    a linear axis the nearest slots' bars were invisible slivers); the values are written beside the dots. The
    nearest slot, which retrieval brings back, in red; τ dotted."""
    labels = [f"{i}: {name.replace('_', ' ')}" for i, name in enumerate(retrieval.stored)]
    fig = go.Figure()
    for name, colour, chosen in (("retrieved (smallest KL)", "#d62728", True), ("other slots", "#1f77b4", False)):
        slots = [i for i in range(len(labels)) if (i == retrieval.slot) == chosen]
        values = [retrieval.distances[i] for i in slots]
        fig.add_trace(go.Scatter(x=[labels[i] for i in slots], y=values, mode="markers+text", name=name,
                                 marker=dict(color=colour, size=12), text=[f"{v:.3g}" for v in values],
                                 textposition="middle right"))  # fmt: skip
    fig.add_hline(
        y=tau, line=dict(color=NEUTRAL, dash="dot"), showlegend=True, name=f"τ = {tau:g}: detection's threshold"
    )
    values = [value for value in [*retrieval.distances, tau] if value > 0]
    low, high = math.log10(min(values)) - 0.3, math.log10(max(values)) + 0.3
    fig.update_layout(
        title=f"A new batch of {retrieval.incoming.replace('_', ' ')}: KL to each slot → slot {retrieval.slot}",
        xaxis=dict(categoryorder="array", categoryarray=labels),
        yaxis=dict(title="symmetric KL (log axis)", type="log", range=[low, high], **log_ticks(10**low, 10**high)),
        height=350,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.25, yanchor="top"),
    )
    return fig
