"""What view 3 (one IMSE step) says about its own numbers: which term moves σ (their pulls, not their values), the
stream so far against Source with its noise band, and the table of σ furthest from the source σ. Split from
``imse.app.teach_text`` (the standing text and the other views' readings), whose rules it follows."""

from __future__ import annotations

from imse.runs.explain.step import BAND_BATCHES, StepReport

__all__ = ["step_text"]


def _range(values: list[float], form: str) -> str:
    low, high = min(values), max(values)
    return format(low, form) if format(low, form) == format(high, form) else f"{low:{form}} to {high:{form}}"


def _pull(report: StepReport, layers: int) -> str:
    """Which term moves σ: not their values but their gradients (pull), on this batch and over the stream so far."""
    pull, diversity = report.pull, report.diversity
    if pull.diversity is None:
        return "With λ<sub>dm</sub> = 0 only the entropy term pulls on σ."
    bigger = "" if report.entropy_term is None else f" against the entropy term's {report.entropy_term:.2f}"
    start = (
        f"**Which term moves σ?** −λ<sub>dm</sub>·L<sub>dm</sub> is {-report.lambda_dm * diversity:.2f}{bigger} "
        f"(L<sub>dm</sub> sums {layers} layers' mean std, about {3 * diversity / layers:.3f} each, over 3 blocks: "
        f"{diversity:.3f}; λ<sub>dm</sub> = {report.lambda_dm:g} multiplies it), but a term's size does not set the "
        "step: its gradient over the adapted σ does (and Adam then rescales each σ's step, so a gradient sets the "
        "step's direction more than its length). That gradient's norm is the term's **pull**, and the cosine "
        "between the two gradients says whether they push the same way (+1), across (0) or against each other (−1)."
    )
    if pull.entropy is None:
        return start + " No sample is reliable on this batch, so only the diversity term pulls."
    both = [p for p in report.pulls if p.entropy and p.diversity is not None and p.cosine is not None]
    ratios, cosines = [p.diversity / p.entropy for p in both], [p.cosine for p in both]
    start += (
        f" On this batch the diversity term's gradient is {pull.diversity / pull.entropy:.1f}× the entropy term's in "
        "norm (a norm over every σ: Adam's per-σ rescaling decides each σ's step) "
        f"(cosine {pull.cosine:+.2f})"
    )
    if len(both) < 2:
        return start + "."
    start += f"; over the {len(both)} batches so far, {_range(ratios, '.1f')}×, cosine {_range(cosines, '+.2f')}"
    if min(ratios) <= 1:
        return start + "."
    varies = ", and the angle between them varies from batch to batch" if max(cosines) - min(cosines) > 0.3 else ""
    return (
        f"{start}: the diversity term has the larger pull on every one{varies}. A larger pull steers σ; it need not "
        "mean better answers (view 2 sets IMSE beside its λ<sub>dm</sub> = 0 twin to measure what it changes)."
    )


def _stream(report: StepReport) -> str:
    """The stream so far: accuracies and their difference written so that the printed numbers add up."""
    tally = report.stream
    adapted, source = round(100 * tally.accuracy("adapted"), 2), round(100 * tally.accuracy("source"), 2)
    gain, band = tally.gain()
    if band is None:
        noise = f"{len(tally.sizes)} of the {BAND_BATCHES} batches a noise band needs: too few to tell gain from noise"
    else:
        noise = (
            f"{'within' if abs(gain) <= band else 'beyond'} noise: two standard errors of the mean per-batch "
            f"difference are ±{band:.2f} points (the batch is the unit, not the image as in view 2: IMSE's model "
            "changes after every batch). The band is re-drawn after every batch, so it may touch 0 somewhere by "
            "chance; this verdict reads it at the end of the stream so far"
        )
        last = tally.last_within_noise()
        if abs(gain) > band and last is not None:
            noise += f" (it still included 0 after batch {last}: read the verdict with that in mind)"
    repeats = sum(tally.sizes[report.batches :])  # images of a second pass (or more) over the stream
    again = f", {repeats} of them a second time" if repeats else ""
    return (
        f"**The stream so far** ({tally.images} images{again}; each batch predicted before IMSE adapts on it): IMSE "
        f"**{adapted:.2f} %** ({sum(tally.adapted)} right), Source (unadapted) **{source:.2f} %** "
        f"({sum(tally.source)}): {adapted - source:+.2f} points, {noise}."
    )


def _table(report: StepReport) -> str:
    steps = report.batch
    return (
        f"**The table** lists the σ furthest from σ<sup>src</sup> so far, largest |σ − σ<sup>src</sup>| first "
        "(equal to the digits shown: by layer, then expert). Adam divides each gradient by a running average of its "
        f"size, so its first step moves every σ by lr = {report.lr:g} exactly, up or down: after one step nearly "
        f"every row ties. Later steps are about lr, sometimes more (this step's largest: "
        f"{report.largest_step / report.lr:.2f} × lr). After n steps the leaders are the σ that moved the same way on "
        f"(nearly) every step, near n × lr (here {steps} × lr = {steps * report.lr:.4f}); the last column counts a "
        "σ's steps that went the same way as its total change. *Relative* is σ − σ<sup>src</sup> in % of "
        "σ<sup>src</sup>, not shown for a tiny σ (under 1 % of its layer's largest), whose "
        "expert carries almost nothing."
    )


def step_text(report: StepReport, corruption: str, severity: int, layers: int) -> str:
    """View 3's reading of one step: the filter, the loss, the stream so far, the objective's pull, the table."""
    loss = "—" if report.loss is None else f"{report.loss:.4f}"
    perturbed = "—" if report.loss_perturbed is None else f"{report.loss_perturbed:.4f}"
    status = "updated" if report.updated else f"**no update** ({report.skip_reason})"
    passes = (report.batch - 1) // report.batches
    batches = report.batches
    where = f", pass {passes + 1} over the stream's {batches} (it starts over after its last batch)" if passes else ""
    where = where or f" of the stream's {batches}"
    again = "; the same images again, already adapted on" if passes else ""
    n = len(report.reliable)
    return (
        f"**Batch {report.batch}**{where} ({corruption.replace('_', ' ')} {severity}; a new stream starts when the "
        f"corruption or severity changes{again}): {sum(report.reliable)} of {n} samples "
        f"reliable (H < E0 = {report.margin:.3f}); loss {loss} at the current code, {perturbed} at the code SAM "
        f"moved uphill; {status}; the step changed {report.changed} of {n} predictions on this batch (scored before "
        f"the step: the changed model counts from the next batch on).\n\n{_stream(report)}\n\n"
        f"{_pull(report, layers)}\n\n{_table(report)}"
    )
