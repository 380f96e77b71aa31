"""Pure functions from lab states (plain data) to Plotly figures. Figures never reach into a model.

Each figure stays small (long curves are decimated, heatmaps pooled to ≤ 128 columns, thumbnails embedded as
small PNGs) so that one live update of all panels stays well under 200 KB.
"""

from __future__ import annotations

import base64
import io

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

__all__ = [
    "accuracy_figure",
    "alignment_figure",
    "bank_figure",
    "batch_figure",
    "empty_figure",
    "shift_figure",
    "spectrum_figure",
    "top5_figure",
]

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
MAX_POINTS = 400


def empty_figure(title: str, note: str = "press Start") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        height=300,
        margin=dict(l=40, r=10, t=40, b=30),
        annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")],
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
    )
    return fig


def _decimate(n: int) -> list[int]:
    if n <= MAX_POINTS:
        return list(range(n))
    step = n / MAX_POINTS
    return sorted({int(i * step) for i in range(MAX_POINTS)} | {n - 1})


def _domain_shapes(fig: go.Figure, domains: list[dict], xref: str = "x", label: bool = True) -> None:
    """Alternate domains shaded, names on top (layout shapes in one update: far faster than add_vrect)."""
    shapes = [
        dict(type="rect", xref=xref, yref="paper", x0=d["start"] - 0.5, x1=d["end"] + 0.5, y0=0, y1=1,
             fillcolor="grey", opacity=0.08, line_width=0)
        for i, d in enumerate(domains) if i % 2
    ]  # fmt: skip
    annotations = []
    if label and len(domains) <= 30:
        annotations = [
            dict(x=(d["start"] + d["end"]) / 2, y=1.0, xref=xref, yref="paper", text=d["name"].replace("_", " "),
                 showarrow=False, textangle=-60, font=dict(size=8), yanchor="bottom")
            for d in domains
        ]  # fmt: skip
    fig.update_layout(shapes=shapes, annotations=list(fig.layout.annotations) + annotations)


def accuracy_figure(state) -> go.Figure:
    """Running online accuracy per method over batches, domains shaded and labelled, and per-domain bars."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32], subplot_titles=("", "per domain (%)"))
    keep = _decimate(len(state.seen))
    for i, method in enumerate(state.methods):
        accuracy = state.accuracy(method)
        fig.add_trace(
            go.Scatter(
                x=keep,
                y=[100 * accuracy[j] for j in keep],
                name=method,
                mode="lines",
                line=dict(color=COLOURS[i % len(COLOURS)]),
            ),
            row=1,
            col=1,
        )
        per_domain = []
        for domain in state.domains:
            s, e = domain["start"], domain["end"]
            before_c = state.correct[method][s - 1] if s else 0
            before_n = state.seen[s - 1] if s else 0
            n = state.seen[e] - before_n
            per_domain.append(100 * (state.correct[method][e] - before_c) / n if n else 0.0)
        fig.add_trace(
            go.Bar(
                x=[d["name"] for d in state.domains],
                y=per_domain,
                name=method,
                marker_color=COLOURS[i % len(COLOURS)],
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    _domain_shapes(fig, state.domains, xref="x", label=True)
    fig.update_layout(
        title=f"Online accuracy — batch {state.batch}/{state.total_batches}, {state.images:,} images",
        height=360,
        margin=dict(l=40, r=10, t=90, b=40),
        legend=dict(orientation="h", y=-0.15),
        barmode="group",
    )
    fig.update_yaxes(title_text="accuracy so far (%)", row=1, col=1, range=[0, 100])
    fig.update_xaxes(title_text="batch", row=1, col=1)
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=8), row=1, col=2)
    return fig


def _short(name: str) -> str:
    return name.replace("model.", "").replace("blocks.", "b").replace(".attn", "").replace(".mlp", "")


def alignment_figure(state, show_source: bool = False) -> go.Figure:
    """Per-expert alignment std (layers × experts, experts in singular-value order, pooled), fixed scale."""
    matrix = state.alignment_source if show_source else state.alignment
    title = "Expert alignment std — " + ("no adaptation (frozen model)" if show_source else "adapting model")
    if not matrix:
        return empty_figure(title, "no spectral layers to show" if state.batch else "press Start")
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            y=[_short(n) for n in state.layer_names[: len(matrix)]],
            colorscale="Viridis",
            zmin=0.0,
            zmax=0.5,
            colorbar=dict(title="std"),
            hovertemplate="layer %{y}<br>expert group %{x}<br>std %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title, height=420, margin=dict(l=80, r=10, t=40, b=40), xaxis_title="experts (largest σ first, pooled)"
    )
    return fig


def shift_figure(state) -> go.Figure:
    """(S − S0)/S0 per layer and expert, and each layer's mean |ΔS/S0| over time."""
    title = "Singular-value shifts (S − S0)/S0"
    if not state.shift_rel:
        return empty_figure(title, "the shown method adapts no singular values" if state.batch else "press Start")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], subplot_titles=("now", "mean |ΔS/S0| per layer"))
    # colour range from the 99th percentile: a few near-zero σ of rank-deficient layers would otherwise have
    # huge relative shifts and wash every other expert out to white
    magnitudes = sorted(abs(v) for row in state.shift_rel for v in row)
    bound = max(1e-6, magnitudes[int(0.99 * (len(magnitudes) - 1))])
    fig.add_trace(
        go.Heatmap(
            z=state.shift_rel,
            y=[_short(n) for n in state.layer_names[: len(state.shift_rel)]],
            colorscale="RdBu",
            zmid=0.0,
            zmin=-bound,
            zmax=bound,
            colorbar=dict(x=0.52, len=0.9),
            hovertemplate="layer %{y}<br>expert group %{x}<br>ΔS/S0 %{z:.2e}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    history = state.shift_history
    keep = _decimate(len(history))
    for layer in range(len(history[0]) if history else 0):
        fig.add_trace(
            go.Scatter(
                x=keep,
                y=[history[j][layer] for j in keep],
                mode="lines",
                name=_short(state.layer_names[layer]),
                line=dict(width=1),
                showlegend=False,
                hovertemplate=_short(state.layer_names[layer]) + "<br>batch %{x}<br>%{y:.2e}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    fig.update_layout(title=title, height=420, margin=dict(l=80, r=10, t=60, b=40))
    fig.update_xaxes(title_text="batch", row=1, col=2)
    return fig


def bank_figure(state) -> go.Figure:
    """Shift score per batch with the τ line, detections, stored/retrieved slots, true boundaries, bank size."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    tau = state.config["tau"]
    scores = state.shift_scores
    keep = _decimate(len(scores))
    fig.add_trace(
        go.Scatter(
            x=keep,
            y=[scores[j] if scores[j] is not None else None for j in keep],
            mode="lines",
            name="shift score D",
            line=dict(color="#444"),
        ),
        row=1,
        col=1,
    )
    if scores:
        fig.add_hline(y=tau, line_dash="dash", line_color="red", annotation_text=f"τ = {tau}", row=1, col=1)
    if state.detections:
        fig.add_trace(
            go.Scatter(
                x=state.detections,
                y=[scores[i] for i in state.detections],
                mode="markers",
                marker=dict(symbol="x", size=10, color="red"),
                name="detected shift",
            ),
            row=1,
            col=1,
        )
    if state.stored:
        fig.add_trace(
            go.Scatter(
                x=[b for b, _ in state.stored],
                y=[scores[b] for b, _ in state.stored],
                mode="markers",
                marker=dict(symbol="triangle-down", size=11, color="#2ca02c"),
                name="stored slot",
                text=[f"stored in slot {s}" for _, s in state.stored],
                hovertemplate="batch %{x}<br>%{text}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if state.retrieved:
        fig.add_trace(
            go.Scatter(
                x=[b for b, _ in state.retrieved],
                y=[scores[b] for b, _ in state.retrieved],
                mode="markers",
                marker=dict(symbol="triangle-up", size=11, color="#1f77b4"),
                name="retrieved slot",
                text=[f"retrieved slot {s}" for _, s in state.retrieved],
                hovertemplate="batch %{x}<br>%{text}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    for domain in state.domains[1:]:
        fig.add_vline(x=domain["start"] - 0.5, line_width=1, line_dash="dot", line_color="grey", row=1, col=1)
    fig.add_trace(
        go.Scatter(
            x=keep, y=[state.bank_size[j] for j in keep], mode="lines", name="bank size", line=dict(color="#9467bd")
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(type="log", title_text="symmetric KL", row=1, col=1)
    fig.update_yaxes(title_text="slots", row=2, col=1)
    fig.update_xaxes(title_text="batch (dotted: true domain boundaries)", row=2, col=1)
    fig.update_layout(title="Domain bank", height=420, margin=dict(l=60, r=10, t=40, b=40))
    return fig


def _grid(images: list[torch.Tensor], size: int = 96, gap: int = 4) -> str:
    """One PNG with the images side by side (one trace instead of one subplot per image: 10× faster to build)."""
    from PIL import Image

    tiles = []
    for image in images:
        tile = Image.fromarray(image.permute(1, 2, 0).numpy())
        tiles.append(tile.resize((size, size), Image.NEAREST if tile.width < size else Image.BILINEAR))
    canvas = Image.new("RGB", (len(tiles) * (size + gap) - gap, size), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * (size + gap), 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def batch_figure(state) -> go.Figure:
    """A few images of the current batch: clean above, corrupted below; label, prediction before → after."""
    thumbs = state.thumbnails
    if not thumbs:
        return empty_figure("The current batch")
    k, size, gap = len(thumbs["labels"]), 96, 4
    names = state.class_names

    def name(i):
        return names[i][:14] if i is not None and 0 <= i < len(names) else str(i)

    fig = go.Figure()
    fig.add_trace(go.Image(source=_grid(list(thumbs["clean"]), size, gap), x0=0, y0=0, dx=1, dy=1, hoverinfo="skip"))
    fig.add_trace(
        go.Image(source=_grid(list(thumbs["corrupted"]), size, gap), x0=0, y0=size + 30, dx=1, dy=1, hoverinfo="skip")
    )
    for i in range(k):
        x = i * (size + gap) + size / 2
        fig.add_annotation(x=x, y=-4, text=f"true: {name(thumbs['labels'][i])}", showarrow=False, font_size=9)
        before, after = name(thumbs["before"][i]), name(thumbs["after"][i])
        fig.add_annotation(x=x, y=size + 26, text=f"{before} → {after}", showarrow=False, font_size=9)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(
        title=f"The current batch ({thumbs['domain']}): clean / corrupted; prediction before → after adaptation",
        height=330,
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


def spectrum_figure(singular_values: list[float], layer: str, highlight: int | None = None) -> go.Figure:
    colours = ["#d62728" if i == highlight else "#1f77b4" for i in range(len(singular_values))]
    fig = go.Figure(
        go.Bar(y=singular_values, marker_color=colours, hovertemplate="expert %{x}<br>σ %{y:.3f}<extra></extra>")
    )
    fig.update_layout(
        title=f"Singular spectrum of {layer}",
        xaxis_title="expert i (σ sorted)",
        yaxis_title="σ_i",
        height=320,
        margin=dict(l=50, r=10, t=40, b=40),
    )
    return fig


def orthogonality_figure(cosines: list[list[float]], layer: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=cosines, zmin=-1, zmax=1, colorscale="RdBu", zmid=0))
    fig.update_layout(
        title=f"cos(expert i output, expert j output) on the image — {layer}",
        xaxis_title="expert j",
        yaxis_title="expert i",
        height=320,
        margin=dict(l=50, r=10, t=40, b=40),
    )
    return fig


def top5_figure(probabilities: list[float], class_names: list[str], title: str) -> go.Figure:
    order = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:5]
    fig = go.Figure(
        go.Bar(
            x=[probabilities[i] for i in order][::-1],
            y=[class_names[i][:30] for i in order][::-1],
            orientation="h",
            marker_color="#1f77b4",
        )
    )
    fig.update_layout(
        title=title, xaxis=dict(range=[0, 1], title="probability"), height=280, margin=dict(l=140, r=10, t=40, b=40)
    )
    return fig
