"""The Teach tab's figures for views 1–3: pure functions from the numbers ``imse.runs.explain`` computes to Plotly
figures (view 4's are in ``teach_map``). Every drawn mark has a legend entry or names itself on an axis; subscripts
are HTML (``λ<sub>dm</sub>``), never a raw underscore; std axes start at 0 or show a change against a stated
reference."""

from __future__ import annotations

import functools
import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from imse.app.theme import MUTED, NEUTRAL, themed
from imse.runs.explain.collapse import CollapseView
from imse.runs.explain.step import BAND_BATCHES, StepReport, StreamTally

__all__ = [
    "CONDITION_COLOURS",
    "collapse_experts_figure",
    "collapse_history_figure",
    "collapse_layers_figure",
    "condition_label",
    "log_ticks",
    "loss_figure",
    "predictions_figure",
    "rank_figure",
    "sample_entropy_figure",
    "short_layer",
    "spectrum_figure",
    "stream_figure",
    "top5_figure",
]

CONDITION_COLOURS = {
    "clean": "#2ca02c",
    "corrupted": "#7f7f7f",
    "IMSE": "#d62728",
    "IMSE, λ_dm = 0": "#ff7f0e",
    "SAR": "#9467bd",
    "TENT": "#1f77b4",
}
_LABELS = {
    "clean": "clean, unadapted",
    "corrupted": "corrupted, unadapted",
    "IMSE, λ_dm = 0": "IMSE, λ<sub>dm</sub> = 0",
}
LAMBDA_DM, L_DM = "λ<sub>dm</sub>", "L<sub>dm</sub>"
_MARGIN = dict(l=55, r=15, t=50, b=45)
_LEGEND_BELOW = dict(orientation="h", y=-0.3, yanchor="top")


def _themed(build):
    """Every Teach figure follows the page's light or dark theme (``imse.app.theme``)."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        return themed(build(*args, **kwargs))

    return wrapper


def short_layer(layer: str) -> str:
    return layer.removeprefix("model.").replace("blocks.", "b")


def condition_label(condition: str) -> str:
    """A condition as figures name it (HTML subscripts)."""
    return _LABELS.get(condition, condition)


def log_ticks(low: float, high: float, base: int = 10) -> dict:
    """Ticks of a log axis at the powers of ``base`` between ``low`` and ``high``, written out plainly (0.01, 0.1,
    1 …); where fewer than two powers lie inside the range (a base-10 axis), at 1, 2 and 5 times each power
    instead, so that the axis can still be read: never the minor ticks' bare digits."""
    first, last = math.floor(math.log(low, base) + 1e-9), math.ceil(math.log(high, base) - 1e-9)
    values = [base**e for e in range(first, last + 1)]
    if base == 10 and sum(low <= v <= high for v in values) < 2:
        values = [m * v for v in values for m in (1, 2, 5) if low <= m * v <= high]
    return dict(tickvals=values, ticktext=[f"{v:g}" for v in values])


# -- view 1 --------------------------------------------------------------------------------------------------------


@_themed
def spectrum_figure(
    singular_values: list[float],
    energy: list[float],
    layer: str,
    *,
    kept: set[int],
    scaled: int,
    scale: float,
    edited: float | None = None,
):
    """σ of every expert (kept ones coloured, zeroed ones grey), numbered from 0, the scaled one red at its edited
    height ``edited`` (σ × scale, or 0 when the k cut zeroed it) with its unedited height a dash, and the
    cumulative energy share of the unedited σ on the right."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    present = scaled < len(singular_values)
    edited = singular_values[scaled] * scale if edited is None and present else edited
    cut = " (cut by k: 0)" if present and scaled not in kept else ""
    groups = [
        ("kept (the k largest)", "#1f77b4", [i for i in range(len(singular_values)) if i in kept and i != scaled]),
        ("zeroed", MUTED, [i for i in range(len(singular_values)) if i not in kept and i != scaled]),
    ]
    for name, colour, indices in groups:
        fig.add_trace(
            go.Bar(
                x=indices,
                y=[singular_values[i] for i in indices],
                marker_color=colour,
                name=name,
                hovertemplate="expert %{x}<br>σ %{y:.3f}<extra></extra>",
            )
        )
    if present:
        fig.add_trace(go.Bar(x=[scaled], y=[edited], marker_color="#d62728",
                             name=f"expert {scaled}: σ × {scale:g}{cut}",
                             hovertemplate="expert %{x}<br>edited σ %{y:.3f}<extra></extra>"))  # fmt: skip
        if edited != singular_values[scaled]:
            # a dash above the bars, not an outline: the edited bar hid an outline under it
            fig.add_trace(go.Scatter(x=[scaled], y=[singular_values[scaled]], mode="markers",
                                     name=f"expert {scaled} before the edit (dash)",
                                     marker=dict(symbol="line-ew", size=16, line=dict(color=NEUTRAL, width=3)),
                                     hovertemplate="expert %{x}<br>σ %{y:.3f}<extra></extra>"))  # fmt: skip
    fig.add_trace(
        go.Scatter(y=energy, mode="lines", name="energy share of the k largest (unedited σ)",
                   line=dict(color="#2ca02c")),
        secondary_y=True,
    )  # fmt: skip
    fig.update_layout(
        title=f"Spectrum of {short_layer(layer)}: {len(kept)} of {len(singular_values)} experts kept",
        height=400,
        margin=_MARGIN,
        legend=_LEGEND_BELOW,
        bargap=0.05,
        barmode="overlay",
    )
    fig.update_xaxes(title_text="expert i (from 0, largest σ first)")
    fig.update_yaxes(title_text="σ<sub>i</sub>", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="energy share", range=[0, 1.02], secondary_y=True, showgrid=False)
    return fig


@_themed
def rank_figure(curve: list[tuple[int, float]], full: float, *, k: int, at_k: float, scope: str, images: int):
    """Accuracy on a fixed labelled set when only the k largest experts are kept (σ unscaled), against k on a log
    axis ticked at powers of 2: the curve's points, every expert's accuracy ``full``, and ``at_k`` at the k now
    chosen, in ``scope`` on ``images`` images."""
    fig = go.Figure()
    ks = [c[0] for c in curve]
    # markers only: accuracy is measured at these k, and a line would suggest values between them
    fig.add_trace(go.Scatter(x=ks, y=[100 * c[1] for c in curve], mode="markers", name="k largest kept (measured)",
                             marker=dict(color="#1f77b4", size=9)))  # fmt: skip
    span = [min(ks + [k]), max(ks + [k])]
    fig.add_trace(go.Scatter(x=span, y=[100 * full] * 2, mode="lines", name=f"all experts: {100 * full:.1f} %",
                             line=dict(color=NEUTRAL, dash="dot")))  # fmt: skip
    fig.add_trace(go.Scatter(x=[k], y=[100 * at_k], mode="markers", marker=dict(size=13, color="#d62728"),
                             name=f"k = {k}: {100 * at_k:.1f} %"))  # fmt: skip
    fig.update_layout(
        title=f"Keeping k experts ({scope}), {images} images",
        xaxis=dict(type="log", title="k (experts kept per layer)", **log_ticks(span[0], span[1], base=2)),
        yaxis=dict(title="accuracy (%)", range=[0, 100]),
        height=350,
        margin=_MARGIN,
        legend=_LEGEND_BELOW,
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


# -- view 2 --------------------------------------------------------------------------------------------------------


def _change(values: list[float], reference: list[float]) -> list[float]:
    return [100 * (v - r) / r if r else 0.0 for v, r in zip(values, reference)]


@_themed
def collapse_experts_figure(view: CollapseView, layer: str):
    """Every expert's alignment std in one layer: clean and corrupted on an axis from 0 (top), and each adapting
    method's change against the corrupted, unadapted model's, in % (bottom), where their differences show."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.5, 0.5])
    reference = view.expert_std["corrupted"][layer]
    for condition in view.conditions:
        stds = view.expert_std[condition][layer]
        unadapted = condition in ("clean", "corrupted")
        fig.add_trace(
            go.Scatter(
                y=stds if unadapted else _change(stds, reference),
                mode="lines",
                name=f"{'top' if unadapted else 'lower'}: {condition_label(condition)}",  # which panel draws it
                line=dict(color=CONDITION_COLOURS.get(condition), width=1.5),
            ),
            row=1 if unadapted else 2,
            col=1,
        )
    fig.update_layout(
        title=f"Each expert's alignment std — {short_layer(layer)}",
        height=460,
        margin=_MARGIN,
        legend=dict(orientation="h", y=-0.16, yanchor="top"),
    )
    fig.update_yaxes(title_text="std", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="% vs corrupted", zeroline=True, row=2, col=1)
    fig.update_xaxes(title_text="expert i (from 0, largest σ first)", row=2, col=1)
    return fig


def _grouped_bars(x: list[str], bars: dict[str, tuple[str, list]], title: str, yaxis: str):
    """One bar per condition at each x, in the conditions' colours; ``bars``: condition -> (legend name, ys)."""
    fig = go.Figure()
    for condition, (name, ys) in bars.items():
        fig.add_trace(go.Bar(x=x, y=ys, name=name, marker_color=CONDITION_COLOURS.get(condition)))
    fig.update_layout(
        title=title,
        yaxis=dict(title=yaxis, rangemode="tozero"),
        barmode="group",
        height=360,
        margin=_MARGIN,
        legend=_LEGEND_BELOW,
    )
    return fig


@_themed
def collapse_layers_figure(view: CollapseView):
    """Each layer's mean std (its experts but the one with the largest std, as in L_dm) per condition."""
    bars = {condition: (condition_label(condition), view.layer_mean[condition]) for condition in view.conditions}
    names = [short_layer(layer) for layer in view.layers]
    return _grouped_bars(names, bars, "Mean std per layer (all experts but the largest-std one)", "mean std")


@_themed
def collapse_history_figure(view: CollapseView):
    """Each adapting method's mean std (over the layers) against the images it has adapted on, as a change in %
    against the corrupted, unadapted model's (the 0 line); clean images' level is said in the subtitle."""
    reference = view.mean_std("corrupted")
    fig = go.Figure()
    longest = max((p[-1][0] for p in view.history.values() if p), default=1)
    fig.add_trace(go.Scatter(x=[0, longest], y=[0, 0], mode="lines", name="corrupted, unadapted (the reference)",
                             line=dict(color=CONDITION_COLOURS["corrupted"], dash="dot")))  # fmt: skip
    for condition, points in view.history.items():
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[100 * (p[1] - reference) / reference for p in points],
                mode="lines+markers",
                name=condition_label(condition),
                line=dict(color=CONDITION_COLOURS.get(condition)),
            )
        )
    clean = 100 * (view.mean_std("clean") - reference) / reference
    fig.update_layout(
        title=dict(text="Mean std while adapting", subtitle=dict(text=f"clean images sit at {clean:+.0f} %")),
        xaxis_title="corrupted images adapted on",
        yaxis_title="% vs corrupted, unadapted",
        height=360,
        margin=_MARGIN,
        legend=_LEGEND_BELOW,
    )
    return fig


@_themed
def predictions_figure(view: CollapseView, class_names: list[str]):
    """How many images each class was predicted for, per condition: collapse shows as one tall bar."""
    bars = {
        c: (f"{condition_label(c)} ({100 * view.accuracy[c]:.0f} %)", view.class_counts[c]) for c in view.conditions
    }  # fmt: skip
    names = [name[:14] for name in class_names]
    return _grouped_bars(names, bars, "Predicted classes (accuracy in the legend)", "images")


# -- view 3 --------------------------------------------------------------------------------------------------------


@_themed
def sample_entropy_figure(report: StepReport):
    """Each sample's entropy before the update, reliable ones (under E0) green, with the E0 line."""
    order = sorted(range(len(report.entropy)), key=report.entropy.__getitem__)
    fig = go.Figure()
    for name, colour, reliable in (("reliable (H < E0)", "#2ca02c", True), ("not reliable", MUTED, False)):
        places = [rank for rank, i in enumerate(order) if report.reliable[i] == reliable]
        fig.add_trace(
            go.Bar(
                x=places,
                y=[report.entropy[order[p]] for p in places],
                marker_color=colour,
                name=name,
                customdata=[order[p] for p in places],
                hovertemplate="sample %{customdata}<br>entropy %{y:.3f}<extra></extra>",
            )
        )
    fig.add_trace(go.Scatter(x=[-0.5, len(order) - 0.5], y=[report.margin] * 2, mode="lines",
                             name=f"E0 = {report.margin:.3f}", line=dict(color="#d62728")))  # fmt: skip
    kept = sum(report.reliable)
    fig.update_layout(
        title=f"Batch {report.batch}: {kept} of {len(report.entropy)} samples reliable",
        xaxis_title="samples, sorted by entropy",
        yaxis=dict(title="entropy H(x)", rangemode="tozero"),
        height=350,
        margin=_MARGIN,
        legend=_LEGEND_BELOW,
        barmode="overlay",
        bargap=0.1,
    )
    return fig


@_themed
def loss_figure(report: StepReport):
    """The objective's two terms, their sum and the loss at SAM's perturbed code (left); how hard each term pulls
    on σ, its gradient's norm (right). Values sit in the bars' names: nothing to collide with an axis."""
    diversity = None if report.diversity is None else -report.lambda_dm * report.diversity
    weighted = f"−{LAMBDA_DM}·{L_DM}"
    values = [
        ("entropy term", report.entropy_term, "#1f77b4"),
        (weighted, diversity, "#ff7f0e"),
        ("sum = loss", report.weighted_sum, "#2ca02c"),
        ("at the code SAM<br>moved uphill", report.loss_perturbed, "#d62728"),
    ]
    pulls = [("entropy term", report.pull.entropy, "#1f77b4"), (weighted, report.pull.diversity, "#ff7f0e")]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.14,
                        subplot_titles=("value", "pull: ‖gradient over σ‖"))  # fmt: skip
    for column, parts in ((1, values), (2, pulls)):
        shown = [(n, v, c) for n, v, c in parts if v is not None and math.isfinite(v)]
        fig.add_trace(
            go.Bar(
                x=[f"{name}<br>{value:.3g}" for name, value, _ in shown],
                y=[value for _, value, _ in shown],
                marker_color=[colour for _, _, colour in shown],
                showlegend=False,
                hovertemplate="%{x}<extra></extra>",
            ),
            row=1,
            col=column,
        )
    status = "updated" if report.updated else f"not updated: {report.skip_reason}"
    fig.update_layout(title=f"The objective on this batch ({status})", height=350, margin=dict(l=45, r=15, t=70, b=70))
    fig.update_yaxes(zeroline=True)
    fig.update_yaxes(rangemode="tozero", row=1, col=2)
    return fig


@_themed
def stream_figure(report: StepReport):
    """IMSE's accuracy over the stream so far minus Source's on the same images (its pre-update predictions, as
    the Lab counts them), after each batch, with two standard errors of that difference around it: where the
    band leaves the 0 line (Source, the reference), adapting has paid off, or cost, by more than noise."""
    tally = report.stream
    seen, gains, banded, low, high = [], [], [], [], []
    for end in range(1, len(tally.sizes) + 1):
        prefix = StreamTally(tally.sizes[:end], tally.adapted[:end], tally.source[:end])
        gain, band = prefix.gain()
        seen.append(prefix.images)
        gains.append(gain)
        if band is not None:  # none before BAND_BATCHES batches: no band at all rather than one of width 0
            banded.append(prefix.images)
            low.append(gain - band)
            high.append(gain + band)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=banded + banded[::-1], y=high + low[::-1], fill="toself", fillcolor=MUTED,
                             line=dict(width=0), name="± 2 standard errors", hoverinfo="skip"))  # fmt: skip
    fig.add_trace(go.Scatter(x=[0, max(seen, default=1)], y=[0, 0], mode="lines", name="Source (the reference)",
                             line=dict(color=NEUTRAL, dash="dot")))  # fmt: skip
    fig.add_trace(go.Scatter(x=seen, y=gains, mode="lines+markers", name="IMSE − Source", line=dict(color="#d62728")))
    adapted, source = 100 * tally.accuracy("adapted"), 100 * tally.accuracy("source")
    fig.update_layout(
        title=dict(
            text=f"The stream so far: IMSE {adapted:.2f} %, Source {source:.2f} %",
            subtitle=dict(
                text=f"{tally.images} images; the band (from batch {BAND_BATCHES} on) re-drawn after each batch: the "
                "verdict reads its last"
            ),
        ),
        xaxis=dict(title="corrupted images streamed", rangemode="tozero"),
        yaxis=dict(title="points", zeroline=False),
        height=350,
        margin=dict(l=55, r=15, t=70, b=45),
        legend=_LEGEND_BELOW,
    )
    return fig
