"""Pure functions from lab states (plain data) to Plotly figures. Figures never reach into a model.

Each figure stays small (long curves are decimated, heatmaps pooled to ≤ 128 columns, thumbnails embedded as
small PNGs) so that one live update of all panels stays well under 200 KB. The live panels are plain figure
specs (``imse.app.figure.Figure``) rather than ``plotly.graph_objects``: they are rebuilt for every update.
"""

from __future__ import annotations

import base64
import io
import math

import torch

from imse.app.accuracy_panel import accuracy_figure
from imse.app.figure import (
    COLOURS,
    Figure,
    decimate,
    domain_marks,
    empty_figure,
    finite,
    layout_spec,
    subplot_title,
)
from imse.app.theme import DIVERGING, NEUTRAL

__all__ = [
    "Figure",
    "accuracy_figure",
    "alignment_figure",
    "bank_figure",
    "batch_figure",
    "collapse_figure",
    "empty_figure",
    "shift_figure",
]


def _short(name: str) -> str:
    return name.replace("model.", "").replace("blocks.", "b").replace(".attn", "").replace(".mlp", "")


def alignment_figure(state, show_source: bool = False) -> Figure:
    """Per-expert alignment std (layers × experts, experts in singular-value order, pooled), fixed scale."""
    matrix = state.alignment_source if show_source else state.alignment
    title = "Expert alignment std — " + ("no adaptation (frozen model)" if show_source else "adapting model")
    if not matrix:
        return empty_figure(title, "no spectral layers to show" if state.batch else "press Start")
    heatmap = dict(
        type="heatmap",
        z=[[finite(v) for v in row] for row in matrix],
        y=[_short(n) for n in state.layer_names[: len(matrix)]],
        colorscale="Viridis",
        zmin=0.0,
        zmax=0.5,
        colorbar=dict(title=dict(text="std")),
        hovertemplate="layer %{y}<br>expert group %{x}<br>std %{z:.3f}<extra></extra>",
    )
    layout = layout_spec(
        title, 420, (80, 10, 100, 40), xaxis=dict(title=dict(text="experts (largest σ first, pooled)"))
    )
    return Figure(data=[heatmap], layout=layout)


def shift_figure(state) -> Figure:
    """(S − S0)/S0 per layer and expert, and each layer's ‖S − S0‖/‖S0‖ over time."""
    title = "Singular-value shifts (S − S0)/S0"
    if not state.shift_rel:
        return empty_figure(title, "the shown method adapts no singular values" if state.batch else "press Start")
    # colour range from the 99th percentile: a few near-zero σ of rank-deficient layers would otherwise have
    # huge relative shifts and wash every other expert out to the middle colour
    magnitudes = sorted(abs(v) for row in state.shift_rel for v in row if math.isfinite(v))
    bound = max(1e-6, magnitudes[int(0.99 * (len(magnitudes) - 1))] if magnitudes else 0.0)
    frozen = set(state.frozen_layers)
    rows = [_short(n) + (" · frozen" if n in frozen else "") for n in state.layer_names[: len(state.shift_rel)]]
    data = [
        dict(type="heatmap", z=[[finite(v) for v in row] for row in state.shift_rel],
             y=rows, colorscale=DIVERGING, zmid=0.0,
             zmin=-bound, zmax=bound, colorbar=dict(x=0.5, len=0.9, thickness=10), xaxis="x", yaxis="y",
             hovertemplate="layer %{y}<br>expert group %{x}<br>ΔS/S0 %{z:.2e}<extra></extra>")
    ]  # fmt: skip
    history = state.shift_history
    keep = decimate(len(history))
    for layer in range(len(history[0]) if history else 0):
        name = _short(state.layer_names[layer])
        data.append(dict(type="scatter", x=keep, y=[finite(history[j][layer]) for j in keep], mode="lines",
                         name=name, line=dict(width=1), showlegend=False, xaxis="x2", yaxis="y2",
                         hovertemplate=name + "<br>batch %{x}<br>%{y:.2e}<extra></extra>"))  # fmt: skip
    note = "frozen: the last blocks' S never change (they carry L_dm)" if frozen else ""
    layout = layout_spec(
        title,
        420,
        (110, 10, 110, 40),
        note,
        annotations=[subplot_title("now, per expert", 0.24), subplot_title("‖S − S0‖/‖S0‖", 1.0, "right")],
        xaxis=dict(domain=[0, 0.47], anchor="y"),
        yaxis=dict(domain=[0, 1], anchor="x"),
        xaxis2=dict(domain=[0.7, 1], anchor="y2", title=dict(text="batch")),
        yaxis2=dict(domain=[0, 1], anchor="x2", side="right"),  # ticks clear of the colour bar
    )
    return Figure(data=data, layout=layout)


def _rolling(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (a batch's top-class share alone is noisy)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def collapse_figure(state, window: int = 5) -> Figure:
    """The paper's collapse readouts per method: the mean expert-alignment std of the last blocks per batch
    (falling = the experts see every input alike) and the share of the most-predicted class (rising = the
    model answers alike), beside the accuracy panel."""
    title = "Collapse"
    if not state.seen:
        return empty_figure(title)
    keep = decimate(len(state.seen))
    data = []
    for i, method in enumerate(state.methods):
        colour = COLOURS[i % len(COLOURS)]
        stds = state.expert_std.get(method, [])
        share = _rolling(state.top_share.get(method, []), window)
        data.append(dict(type="scatter", x=keep, y=[finite(stds[j]) for j in keep],
                         mode="lines", name=method, line=dict(color=colour), xaxis="x", yaxis="y",
                         legendgroup=method))  # fmt: skip
        data.append(dict(type="scatter", x=keep, y=[100 * share[j] for j in keep], mode="lines",
                         name=method, line=dict(color=colour), showlegend=False, xaxis="x2", yaxis="y2",
                         legendgroup=method))  # fmt: skip
    classes = len(state.class_names)
    shapes, _ = domain_marks(state.domains, xref="x", label=False)
    shapes2, _ = domain_marks(state.domains, xref="x2", label=False)
    shapes += shapes2
    shapes.append(dict(type="line", xref="x2 domain", yref="y2", x0=0, x1=1, y0=100 / classes, y1=100 / classes,
                       line=dict(dash="dot", color="grey")))  # fmt: skip
    layout = layout_spec(
        title,
        390,
        (60, 10, 130, 40),
        "expert-alignment std of the last blocks, and the most-predicted class",
        legend=dict(orientation="h", y=-0.2),
        shapes=shapes,
        annotations=[  # two short lines each: they stay apart on a phone's width too
            subplot_title("mean alignment std<br>(lower = collapsing)", 0.22),
            subplot_title(f"top class, % of a batch<br>(mean of {window}; dotted: 1/C)", 0.78),
        ],
        xaxis=dict(domain=[0, 0.44], anchor="y", title=dict(text="batch")),
        yaxis=dict(domain=[0, 1], anchor="x"),
        xaxis2=dict(domain=[0.56, 1], anchor="y2", title=dict(text="batch")),
        yaxis2=dict(domain=[0, 1], anchor="x2", range=[0, 100]),
    )
    return Figure(data=data, layout=layout)


def _markers(event: str, points: list[tuple[int, int]], scores: list) -> dict:
    """The bank's ``event`` ("stored" or "retrieved") at each (batch, slot) of ``points``, on the score curve."""
    styles = {"stored": ("triangle-down", "#2ca02c", "stored slot", "stored in"),
              "retrieved": ("triangle-up", "#1f77b4", "retrieved slot", "retrieved")}  # fmt: skip
    symbol, colour, name, verb = styles[event]
    return dict(type="scatter", x=[b for b, _ in points], y=[finite(scores[b]) for b, _ in points],
                mode="markers", marker=dict(symbol=symbol, size=11, color=colour), name=name, xaxis="x", yaxis="y",
                text=[f"{verb} slot {s}" for _, s in points],
                hovertemplate="batch %{x}<br>%{text}<extra></extra>")  # fmt: skip


def bank_figure(state) -> Figure:
    """Shift score per batch with the τ line, detections, stored/retrieved slots, true boundaries, bank size."""
    tau = state.config["tau"]
    scores = state.shift_scores
    keep = decimate(len(scores))
    data = [
        dict(type="scatter", x=keep, y=[finite(scores[j]) for j in keep], mode="lines", name="shift score D",
             line=dict(color=NEUTRAL), xaxis="x", yaxis="y")
    ]  # fmt: skip
    if state.detections:
        data.append(dict(type="scatter", x=state.detections, y=[finite(scores[i]) for i in state.detections],
                         mode="markers", marker=dict(symbol="x", size=10, color="red"), name="detected shift",
                         xaxis="x", yaxis="y"))  # fmt: skip
    for event, points in (("stored", state.stored), ("retrieved", state.retrieved)):
        if points:
            data.append(_markers(event, points, scores))
    data.append(dict(type="scatter", x=keep, y=[state.bank_size[j] for j in keep], mode="lines", name="bank size",
                     line=dict(color="#9467bd"), xaxis="x", yaxis="y2"))  # fmt: skip
    shapes = [
        dict(type="line", xref="x", yref="y domain", x0=d["start"] - 0.5, x1=d["start"] - 0.5, y0=0, y1=1,
             line=dict(width=1, dash="dot", color="grey"))
        for d in state.domains[1:]
    ]  # fmt: skip
    annotations = []
    if scores:
        shapes.append(dict(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=tau, y1=tau,
                           line=dict(dash="dash", color="red")))  # fmt: skip
        annotations.append(dict(text=f"τ = {tau}", xref="x domain", yref="y", x=1, y=math.log10(tau),
                                xanchor="right", yanchor="bottom", showarrow=False))  # fmt: skip
    layout = layout_spec(
        "Domain bank",
        440,
        (60, 10, 100, 40),
        legend=dict(orientation="h", y=-0.18),  # below: the plot keeps the panel's width, also on a phone
        shapes=shapes,
        annotations=annotations,
        xaxis=dict(anchor="y2", title=dict(text="batch (dotted: true domain boundaries)")),
        yaxis=dict(domain=[0.3, 1], type="log", dtick=1, exponentformat="power", title=dict(text="symmetric KL")),
        yaxis2=dict(domain=[0, 0.24], anchor="x", rangemode="tozero", title=dict(text="slots")),
    )
    return Figure(data=data, layout=layout)


def _grid(images: list[torch.Tensor], size: int = 96, gap: int = 4) -> str:
    """One PNG with the images side by side (one trace instead of one subplot per image: 10× faster to build)."""
    from PIL import Image

    tiles = []
    for image in images:
        tile = Image.fromarray(image.permute(1, 2, 0).numpy())
        tiles.append(tile.resize((size, size), Image.NEAREST if tile.width < size else Image.BILINEAR))
    canvas = Image.new("RGBA", (len(tiles) * (size + gap) - gap, size), (0, 0, 0, 0))  # gaps show the page
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * (size + gap), 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def batch_figure(state) -> Figure:
    """A few images of the current batch: clean above, corrupted below; label, prediction before → after."""
    thumbs = state.thumbnails
    if not thumbs:
        return empty_figure("The current batch")
    k, size, gap = len(thumbs["labels"]), 96, 4
    names = state.class_names

    def name(i):
        if i is not None and i < 0:  # UNLABELLED: a user's image without a class
            return "no label"
        return names[i][:10] if i is not None and 0 <= i < len(names) else str(i)

    below = size + 40  # room for two lines of labels between the rows
    data = [
        dict(type="image", source=_grid(list(thumbs["clean"]), size, gap), x0=0, y0=0, dx=1, dy=1, hoverinfo="skip"),
        dict(type="image", source=_grid(list(thumbs["corrupted"]), size, gap), x0=0, y0=below, dx=1, dy=1,
             hoverinfo="skip"),
    ]  # fmt: skip
    annotations = []
    for i in range(k):  # short labels, the prediction on two lines: they stay apart on a phone's width too
        x = i * (size + gap) + size / 2
        before, after = name(thumbs["before"][i]), name(thumbs["after"][i])
        label = dict(x=x, showarrow=False, yanchor="bottom", font=dict(size=9))
        annotations.append(dict(label, y=-2, text=name(thumbs["labels"][i])))
        annotations.append(dict(label, y=below - 2, text=f"{before}<br>→ {after}"))
    layout = layout_spec(
        f"The current batch: {thumbs['domain']}",
        360,
        (10, 10, 100, 10),
        "top: your image as it is (label) · bottom: the same (prediction before → after)"
        if thumbs.get("as_is")
        else "top: clean (label) · bottom: corrupted (prediction before → after)",
        annotations=annotations,
        xaxis=dict(visible=False),
        yaxis=dict(visible=False, autorange="reversed", scaleanchor="x"),
    )
    return Figure(data=data, layout=layout)
