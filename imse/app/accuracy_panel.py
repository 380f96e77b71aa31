"""The Lab's accuracy panel: each method's running accuracy and per-domain accuracy, and with Source in the run
each method's gain over Source (running and per domain) on a row of its own; without labels, agreement with Source
in place of accuracy. A plain figure spec (``imse.app.figure``), rebuilt for every update."""

from __future__ import annotations

from imse.app.figure import COLOURS, Figure, decimate, domain_labels, domain_marks, layout_spec, subplot_title
from imse.runs.lab import method_name

__all__ = ["accuracy_figure", "fitted_range", "gains_over_source"]


def _source_label(state) -> str | None:
    return next((m for m in state.methods if method_name(m) == "source"), None)  # as the results table finds it


def gains_over_source(state) -> dict[str, float]:
    """Each adapting method's accuracy so far minus Source's, in points (empty without Source, batches or labels)."""
    source = _source_label(state)
    if source is None or not state.seen or not state.labelled:
        return {}
    base = state.correct[source][-1]
    return {m: 100 * (state.correct[m][-1] - base) / state.seen[-1] for m in state.methods if m != source}


def _counts(state) -> dict[str, list[int]]:
    """The cumulative counts the accuracy panel draws: right answers, or without labels answers equal to Source's."""
    return state.correct if state.labelled else state.agree


def _per_domain(state, method: str) -> list[float]:
    """The method's accuracy (%), or agreement with Source without labels, on each domain visit, from the
    cumulative counts (a visit has ≥ 1 image)."""
    correct, seen = [0, *_counts(state)[method]], [0, *state.seen]
    return [100 * (correct[d["end"] + 1] - correct[d["start"]]) / (seen[d["end"] + 1] - seen[d["start"]])
            for d in state.domains]  # fmt: skip


def fitted_range(values: list[float], floor: float = 1.0) -> list[float]:
    """An axis fitted to the gains, zero always in view and at least ``floor`` points tall, with a margin: a
    3-point gain fills most of it (on the 0–100 accuracy axis it is a hair's breadth)."""
    lo, hi = min([0.0, *values]), max([0.0, *values])
    if hi - lo < floor:
        middle = (lo + hi) / 2
        lo, hi = min(lo, middle - floor / 2), max(hi, middle + floor / 2)
    pad = 0.15 * (hi - lo)
    return [lo - pad, hi + pad]


def accuracy_figure(state) -> Figure:
    """Running online accuracy per method over batches (domains shaded and labelled) and per-domain bars. With
    Source in the run, a second row draws each method's gain over Source in points, running and per domain,
    on an axis fitted to the gains, Source being its zero line; the legend and the title say the gain so far.
    Without labels, each method's agreement with Source stands in for accuracy, and the title says so."""
    gains = gains_over_source(state)
    data, gain_row = _accuracy_traces(state, gains)
    title, subtitle = _accuracy_words(state, gains)
    return Figure(data=data, layout=_accuracy_layout(state, title, subtitle, gain_row))


def _accuracy_traces(state, gains: dict[str, float]) -> tuple[list[dict], dict | None]:
    """Each method's running curve and per-domain bars, and with gains its gain curve and bars; and what the gain
    row's axes need (Source, its colour, every gain drawn) or None."""
    keep = decimate(len(state.seen))
    source = _source_label(state) if gains else None
    labels = domain_labels(state.domains)
    baseline = _per_domain(state, source) if source else []
    data, running, per_domain = [], [], []
    for i, method in enumerate(state.methods):
        colour = COLOURS[i % len(COLOURS)]
        accuracy = state.accuracy(method) if state.labelled else state.agreement(method)
        name = f"{method}: {gains[method]:+.1f} pts vs Source" if method in gains else method
        data.append(dict(type="scatter", x=keep, y=[100 * accuracy[j] for j in keep], name=name, mode="lines",
                         line=dict(color=colour), legendgroup=method, xaxis="x", yaxis="y"))  # fmt: skip
        bars = _per_domain(state, method)
        data.append(dict(type="bar", x=labels, y=bars, name=method, marker=dict(color=colour), showlegend=False,
                         legendgroup=method, xaxis="x2", yaxis="y2"))  # fmt: skip
        if method not in gains:
            continue
        gain = [100 * (state.correct[method][j] - state.correct[source][j]) / state.seen[j] for j in keep]
        domain_gain = [b - s for b, s in zip(bars, baseline)]
        running += gain
        per_domain += domain_gain
        data.append(dict(type="scatter", x=keep, y=gain, name=method, mode="lines", line=dict(color=colour),
                         showlegend=False, legendgroup=method, xaxis="x3", yaxis="y3",
                         hovertemplate=f"{method}<br>batch %{{x}}<br>%{{y:.2f}} pts<extra></extra>"))  # fmt: skip
        data.append(dict(type="bar", x=labels, y=domain_gain, name=method, marker=dict(color=colour),
                         showlegend=False, legendgroup=method, xaxis="x4", yaxis="y4", textposition="outside",
                         text=[f"{g:+.1f}" for g in domain_gain], cliponaxis=False, textfont=dict(size=9)))  # fmt: skip
    if not gains:
        return data, None
    colour = COLOURS[state.methods.index(source) % len(COLOURS)]
    return data, dict(source=source, colour=colour, running=running, per_domain=per_domain)


def _accuracy_words(state, gains: dict[str, float]) -> tuple[str, str]:
    """The panel's title and subtitle: where the run is and the gains so far, or that there are no labels."""
    progress = f"batch {state.batch}/{state.total_batches}, {state.images:,} images"
    if not state.labelled:
        said = "your images have no labels: each method's answers that equal the unadapted model's (Source)"
        return f"No labels: agreement with Source — {progress}", said
    so_far = "; ".join(f"{m.split(' (')[0]} {g:+.1f}" for m, g in gains.items())
    return f"Online accuracy — {progress}", f"gain over Source so far (points): {so_far}" if so_far else ""


def _accuracy_layout(state, title: str, subtitle: str, gain_row: dict | None) -> dict:
    """The whole layout, in one place: accuracy (running, per domain) across the panel, or with gains, accuracy
    above and the gains below, each gain axis fitted to its own values, Source its dashed zero line; the batch
    axis shared and the domain names written once, under the lowest row."""
    shapes, annotations = domain_marks(state.domains, xref="x", label=True)
    top = [0.5, 1] if gain_row else [0, 1]
    below = dict(showticklabels=False, title=None) if gain_row else dict(title=dict(text="batch"))
    axes = dict(
        xaxis=dict(domain=[0, 0.64], anchor="y", **below),
        yaxis=dict(domain=top, anchor="x", range=[0, 100],
                   title=dict(text="accuracy so far (%)" if state.labelled else "agreement with Source (%)")),
        xaxis2=dict(domain=[0.72, 1], anchor="y2", tickangle=-60, tickfont=dict(size=8),
                    **({"showticklabels": False} if gain_row else {})),
        yaxis2=dict(domain=top, anchor="x2"),
    )  # fmt: skip
    annotations = [*annotations, subplot_title("per domain (%)", 0.86)]
    extra = {}
    if gain_row:
        axes.update(_gain_axes(gain_row["running"], gain_row["per_domain"]))
        shapes = shapes + [
            dict(
                type="line",
                xref=f"x{axis} domain",
                yref=f"y{axis}",
                x0=0,
                x1=1,
                y0=0,
                y1=0,
                line=dict(color=gain_row["colour"], dash="dash", width=1.5),
            )
            for axis in ("3", "4")
        ]
        annotations += [
            dict(text=gain_row["source"], xref="x3 domain", yref="y3", x=1, y=0, xanchor="right", yanchor="bottom",
                 showarrow=False, font=dict(size=9)),
            subplot_title("vs Source (pts)", 0.86, y=0.4),
        ]  # fmt: skip
        # the gains' labels are hidden where the bars are too narrow for them (a phone): the axis still reads
        extra["uniformtext"] = dict(minsize=8, mode="hide")
    return layout_spec(
        title,
        560 if gain_row else 380,
        (50, 10, 140, 40),
        subtitle,
        legend=dict(orientation="h", y=-0.16 if gain_row else -0.22),  # below the x-axis title, also when it wraps
        barmode="group",
        shapes=shapes,
        annotations=annotations,
        **axes,
        **extra,
    )


def _gain_axes(running: list[float], per_domain: list[float]) -> dict:
    """The gain row's axes, under the accuracy's: running gains against the shared batch axis, per-domain gains."""
    return dict(
        xaxis3=dict(domain=[0, 0.64], anchor="y3", matches="x", title=dict(text="batch")),
        yaxis3=dict(domain=[0, 0.4], anchor="x3", range=fitted_range(running), zeroline=False,
                    title=dict(text="gain over Source (pts)")),
        xaxis4=dict(domain=[0.72, 1], anchor="y4", matches="x2", tickangle=-60, tickfont=dict(size=8)),
        yaxis4=dict(domain=[0, 0.4], anchor="x4", range=fitted_range(per_domain), zeroline=False),
    )  # fmt: skip
