"""The Teach tab's figures: pure functions from the numbers ``imse.runs.explain`` computes to Plotly figures."""

from __future__ import annotations

import functools
import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from imse.app.theme import MUTED, NEUTRAL, themed
from imse.runs.explain.collapse import CollapseView
from imse.runs.explain.domains import DomainMap, Retrieval
from imse.runs.explain.step import StepReport

__all__ = [
    "CONDITION_COLOURS",
    "collapse_experts_figure",
    "collapse_history_figure",
    "collapse_layers_figure",
    "domain_map_figure",
    "kl_figure",
    "loss_figure",
    "predictions_figure",
    "step_predictions_figure",
    "rank_figure",
    "retrieval_figure",
    "sample_entropy_figure",
    "spectrum_figure",
    "top5_figure",
]

CONDITION_COLOURS = {
    "clean": "#2ca02c",
    "corrupted": "#7f7f7f",
    "IMSE": "#d62728",
    "IMSE, λ_dm = 0": "#ff7f0e",
    "TENT": "#1f77b4",
}
_MARGIN = dict(l=55, r=15, t=50, b=45)


def _themed(build):
    """Every Teach figure follows the page's light or dark theme (``imse.app.theme``)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        return themed(build(*args, **kwargs))

    return wrapper


def _short(layer: str) -> str:
    return layer.removeprefix("model.").replace("blocks.", "b")


@_themed
def spectrum_figure(singular_values: list[float], energy: list[float], layer: str, kept: set[int], scaled: int | None):
    """σ of every expert (kept ones coloured, the scaled one red) with the cumulative energy share on the right."""
    colours = ["#d62728" if i == scaled else "#1f77b4" if i in kept else MUTED for i in range(len(singular_values))]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(
            y=singular_values,
            marker_color=colours,
            name="σ_i",
            hovertemplate="expert %{x}<br>σ %{y:.3f}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(y=energy, mode="lines", name="share of Σσ² in the k largest", line=dict(color="#2ca02c")),
        secondary_y=True,
    )
    fig.update_layout(
        title=f"Spectrum of {_short(layer)}: {len(kept)} of {len(singular_values)} experts kept",
        height=330,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.25),
        bargap=0.05,
    )
    fig.update_xaxes(title_text="expert i (largest σ first)")
    fig.update_yaxes(title_text="σ_i", secondary_y=False)
    fig.update_yaxes(title_text="energy share", range=[0, 1.02], secondary_y=True)
    return fig


@_themed
def rank_figure(curve: list[tuple[int, float]], full: float, *, k: int, at_k: float, scope: str, images: int):
    """Accuracy on a fixed labelled set when only the k largest experts are kept, against k (log axis): the curve's
    points, all experts' accuracy ``full``, and ``at_k`` at the k now chosen, in ``scope`` on ``images`` images."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[c[0] for c in curve], y=[100 * c[1] for c in curve], mode="lines+markers", name="k"))
    fig.add_trace(go.Scatter(x=[k], y=[100 * at_k], mode="markers", marker=dict(size=13, color="#d62728"), name="now"))
    fig.add_hline(y=100 * full, line_dash="dot", annotation_text=f"all experts: {100 * full:.1f} %")
    fig.update_layout(
        title=f"Keeping k experts ({scope}), {images} images",
        xaxis=dict(type="log", title="k (experts kept per layer)"),
        yaxis=dict(title="accuracy (%)", range=[0, 100]),
        height=330,
        margin=_MARGIN,
        showlegend=False,
    )
    return fig


@_themed
def top5_figure(probabilities: list[float], class_names: list[str], title: str):
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
        title=title, xaxis=dict(range=[0, 1], title="probability"), height=260, margin=dict(l=140, r=10, t=40, b=40)
    )
    return fig


@_themed
def collapse_experts_figure(view: CollapseView, layer: str):
    """Every expert's alignment std in one layer, one line per condition."""
    fig = go.Figure()
    for condition in view.conditions:
        stds = view.expert_std[condition][layer]
        fig.add_trace(
            go.Scatter(
                y=stds, mode="lines", name=condition, line=dict(color=CONDITION_COLOURS.get(condition), width=1.5)
            )
        )
    fig.update_layout(
        title=f"Each expert's alignment std — {_short(layer)}",
        xaxis_title="expert i (largest σ first)",
        yaxis_title="std over images × tokens",
        height=340,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.22),
    )
    return fig


def _grouped_bars(x: list[str], bars: dict[str, tuple[str, list]], title: str, yaxis: str):
    """One bar per condition at each x, in the conditions' colours; ``bars``: condition -> (legend name, ys)."""
    fig = go.Figure()
    for condition, (name, ys) in bars.items():
        fig.add_trace(go.Bar(x=x, y=ys, name=name, marker_color=CONDITION_COLOURS.get(condition)))
    fig.update_layout(
        title=title,
        yaxis_title=yaxis,
        barmode="group",
        height=340,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.3),
    )
    return fig


@_themed
def collapse_layers_figure(view: CollapseView):
    """The layer mean (all experts but the largest, as in L_dm) per layer and condition."""
    bars = {condition: (condition, view.layer_mean[condition]) for condition in view.conditions}
    names = [_short(layer) for layer in view.layers]
    return _grouped_bars(names, bars, "Layer mean std (all experts but the largest)", "mean std")


@_themed
def collapse_history_figure(view: CollapseView):
    """The mean std (over the layers) of each adapting method against the images it has adapted on."""
    fig = go.Figure()
    fig.add_hline(  # where every method starts (clean images sit at view.mean_std("clean"), far above)
        y=view.mean_std("corrupted"), line_dash="dot", line_color=CONDITION_COLOURS["corrupted"],
        annotation_text="corrupted, unadapted",
    )  # fmt: skip
    for condition, points in view.history.items():
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                mode="lines+markers",
                name=condition,
                line=dict(color=CONDITION_COLOURS.get(condition)),
            )
        )
    fig.update_layout(
        title="Mean std while adapting",
        xaxis_title="corrupted images adapted on",
        yaxis_title="mean std",
        height=340,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.3),
    )
    return fig


@_themed
def predictions_figure(view: CollapseView, class_names: list[str]):
    """How many images each class was predicted for, per condition: collapse shows as one tall bar."""
    bars = {
        c: (f"{c} ({100 * view.accuracy[c]:.0f} %)", view.class_counts[c]) for c in view.conditions
    }  # fmt: skip
    names = [name[:14] for name in class_names]
    return _grouped_bars(names, bars, "Predicted classes (accuracy in the legend)", "images")


@_themed
def sample_entropy_figure(report: StepReport):
    """Each sample's entropy before the update, reliable ones (under E0) in colour, with the E0 line."""
    order = sorted(range(len(report.entropy)), key=report.entropy.__getitem__)
    colours = ["#2ca02c" if report.reliable[i] else MUTED for i in order]
    fig = go.Figure(
        go.Bar(
            y=[report.entropy[i] for i in order],
            marker_color=colours,
            customdata=order,
            hovertemplate="sample %{customdata}<br>entropy %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=report.margin, line_color="#d62728", annotation_text=f"E0 = {report.margin:.3f}")
    kept = sum(report.reliable)
    fig.update_layout(
        title=f"Batch {report.batch}: {kept} of {len(report.entropy)} samples pass the entropy filter",
        xaxis_title="samples, sorted by entropy",
        yaxis_title="entropy H(x)",
        height=330,
        margin=_MARGIN,
    )
    return fig


@_themed
def loss_figure(report: StepReport):
    """The objective's two terms, their weighted sum, and the loss again at SAM's perturbed code."""
    names, values, colours = [], [], []
    diversity = None if report.diversity is None else -report.lambda_dm * report.diversity
    parts = [
        ("entropy term", report.entropy_term, "#1f77b4"),
        (f"−λ_dm·L_dm (λ={report.lambda_dm:g})", diversity, "#ff7f0e"),
        ("sum = loss", report.weighted_sum, "#2ca02c"),
        ("loss at SAM's perturbed code", report.loss_perturbed, "#d62728"),
    ]
    for name, value, colour in parts:
        if value is not None and math.isfinite(value):
            names.append(name)
            values.append(value)
            colours.append(colour)
    fig = go.Figure(
        go.Bar(
            x=names,
            y=values,
            marker_color=colours,
            text=[f"{v:.4f}" for v in values],
            textposition="outside",
            cliponaxis=False,
        )
    )
    status = "updated" if report.updated else f"not updated: {report.skip_reason}"
    fig.update_layout(title=f"The objective on this batch ({status})", height=330, margin=_MARGIN, yaxis_title="value")
    return fig


@_themed
def step_predictions_figure(report: StepReport, class_names: list[str]):
    """Predicted classes before and after the step, with the accuracy of each."""
    count = len(class_names)
    before = [report.before.count(c) for c in range(count)]
    after = [report.after.count(c) for c in range(count)]
    right_before = sum(p == y for p, y in zip(report.before, report.labels))
    right_after = sum(p == y for p, y in zip(report.after, report.labels))
    n = len(report.labels)
    fig = go.Figure()
    names = [name[:14] for name in class_names]
    fig.add_trace(go.Bar(x=names, y=before, name=f"before ({right_before}/{n} right)", marker_color="#7f7f7f"))
    fig.add_trace(go.Bar(x=names, y=after, name=f"after ({right_after}/{n} right)", marker_color="#d62728"))
    fig.update_layout(
        title="Predictions on this batch, before → after the step",
        barmode="group",
        yaxis_title="images",
        height=330,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.3),
    )
    return fig


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
            colorbar=dict(title="log10 KL"),
        )
    )
    note = f"● over τ = {domains.tau:g}: a new domain"
    fig.update_layout(
        title=dict(text="Symmetric KL between descriptors", subtitle=dict(text=note)),
        height=470,
        margin=dict(l=110, r=15, t=50, b=100),
        yaxis=dict(autorange="reversed"),
    )
    return fig


@_themed
def domain_map_figure(domains: DomainMap, retrieval: Retrieval | None = None):
    """The domains on a 2-D map (distances ≈ √KL) with the circle √τ around the clean data: inside it, a batch
    would not start a new domain (approximately: the map is a projection)."""
    xs, ys = [p[0] for p in domains.xy], [p[1] for p in domains.xy]
    stored = set(retrieval.stored) if retrieval else set()
    incoming = retrieval.incoming if retrieval else None
    colours = ["#2ca02c" if n == "clean" else "#d62728" if n in stored else "#1f77b4" for n in domains.names]
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers+text",
            text=[
                name.replace("_", " ") if name == "clean" or name in stored or name == incoming else ""
                for name in domains.names
            ],
            hovertext=[name.replace("_", " ") for name in domains.names],
            textposition="top center",
            marker=dict(
                size=11,
                color=colours,
                line=dict(color=NEUTRAL, width=[3 if n == incoming else 0 for n in domains.names]),
            ),
            hoverinfo="text",
        )
    )
    radius = math.sqrt(domains.tau)
    cx, cy = domains.xy[0]
    fig.add_shape(type="circle", x0=cx - radius, x1=cx + radius, y0=cy - radius, y1=cy + radius, line_color="#2ca02c")
    fig.update_layout(
        title=dict(text="Domain map (distance ≈ √KL)", subtitle=dict(text="red: stored; ringed: the new batch")),
        height=470,
        margin=_MARGIN,
        xaxis=dict(zeroline=False, title=""),
        yaxis=dict(zeroline=False, title="", scaleanchor="x"),
        showlegend=False,
    )
    return fig


@_themed
def retrieval_figure(retrieval: Retrieval, tau: float):
    """KL from the new batch to every slot of the bank; the slot top-1 retrieval brings back in red."""
    colours = ["#d62728" if i == retrieval.slot else "#1f77b4" for i in range(len(retrieval.stored))]
    labels = [f"{i}: {name.replace('_', ' ')}" for i, name in enumerate(retrieval.stored)]
    fig = go.Figure(go.Bar(x=labels, y=retrieval.distances, marker_color=colours))
    fig.add_hline(y=tau, line_dash="dot", annotation_text=f"τ = {tau:g}")
    fig.update_layout(
        title=f"A new batch of {retrieval.incoming.replace('_', ' ')}: KL to each slot → slot {retrieval.slot}",
        yaxis=dict(title="symmetric KL", type="log"),
        height=330,
        margin=_MARGIN,
    )
    return fig
