"""The Teach tab's words: each view's standing text (with its formula), and the sentences that read a view's own
numbers back to the visitor. Every word is defined where it is first used (code, slot, top-class share, reliable,
E0 …), experts are numbered from 0, largest σ first, everywhere, and a result is read as it came out: when IMSE does
not win, the text says so and why. Markdown with ``$…$`` LaTeX (``LATEX``); no numbers are computed here."""

from __future__ import annotations

from imse.runs.explain.collapse import COLLAPSE_RISE, CollapseView
from imse.runs.explain.domains import Retrieval
from imse.runs.explain.step import StepReport

__all__ = [
    "INTRO",
    "LATEX",
    "TEACH_TEXT",
    "TIE_IMAGES",
    "collapse_text",
    "domains_text",
    "experts_text",
    "step_text",
    "why_sigma",
]

LATEX = [{"left": "$", "right": "$", "display": False}]
TIE_IMAGES = 2  # view 2: accuracies this few images apart (of 128) are read as a tie

INTRO = (
    "**Test-time adaptation** (TTA): a trained model keeps adjusting itself, without labels, on the test images it "
    "is asked to classify, here images corrupted by noise, blur, weather or lost contrast. The usual signal is the "
    "model's own confidence: lower the entropy of its predictions (TENT does this to the LayerNorms' scale and "
    "shift). Its risk is **collapse**: predictions crowding into a few classes. IMSE adapts only the singular values "
    "σ of the ViT's linear layers, and adds a term that keeps the features diverse. Four views, on the backbone you "
    "pick; each number says which edits or which images it includes, and experts are numbered from 0, largest σ "
    "first, in every view and formula."
)

TEACH_TEXT = {
    "experts": r"""
**1 · Spectral experts.** SVD splits every linear layer into rank-1 *experts*,
$W = U\,\mathrm{diag}(\sigma)\,V^\top = \sum_{i=0}^{r-1} \sigma_i\, u_i v_i^\top$: expert $i$ (from 0, largest
$\sigma_i$ first) writes along $u_i$, scaled by $\sigma_i$, as much as the input points along $v_i$. Keeping only the
$k$ largest gives the best rank-$k$ layer: slide $k$ down to see how few experts carry the model, and scale one
$\sigma_i$ to see what it does. IMSE adapts only the $\sigma_i$. Every adapted layer's $\sigma$ vector, together, is
the model's **code**: what IMSE adapts, stores and brings back.
""",
    "collapse": r"""
**2 · Collapse, measured.** An expert's *alignment* with an input row $x_n$ (one token of one image: every token of
every image counts) is $a_{n,i} = v_i^\top x_n / \lVert x_n\rVert$, and $\mathrm{Std}_i$ its spread over them: an expert
whose alignment no longer varies has stopped telling images apart. A layer's **mean std** averages $\mathrm{Std}_i$
over its experts but the one whose std is largest, as $L_{dm}$ does (view 3). **Collapse** shows in the predictions:
the **top-class share** is the share of images given the most-predicted class (10 % when 10 classes are balanced,
100 % when every image gets the same class). Corruption alone can already crowd the predictions; collapse *from
adaptation* is the share rising further while a method adapts (here: by RISE points or more over the unadapted
model's, on the same images). **Measure** adapts IMSE, IMSE without its diversity term ($\lambda_{dm} = 0$, view
3) and TENT on ADAPTED images of the tab's corruption and severity, and measures them, and the unadapted model on
the same images clean and corrupted, on MEASURED of those images. The plots' std axes start at 0, or show a
method's change in % against the corrupted, unadapted model, where small differences would otherwise look large.
""",
    "step": r"""
**3 · IMSE, step by step.** A sample is **reliable** when its prediction's entropy $H(x) = -\sum_c p_c \ln p_c$ is
under $E_0 = 0.4 \ln C$ ($C$ classes): only those confident predictions enter the entropy term. The loss is
$\mathcal{L} = \tfrac{1}{|R|}\sum_{x \in R} H(x) \;-\; \lambda_{dm} L_{dm}$ over the reliable set $R$, with
$L_{dm} = \tfrac{1}{3}\sum_{\ell} \mathrm{mean}_{i \neq i^\ast_\ell}\,\mathrm{Std}_i^{(\ell)}$ over the 12 layers $\ell$
of the last three blocks. $L_{dm}$ reads every token of **every** sample of the batch, reliable or not, and leaves
out each layer's expert $i^\ast_\ell$ whose std is largest: that one varies most already, and the mean is about the
experts that could go flat. The last three blocks' own $\sigma$ stay at the source values: $L_{dm}$, measured on
their inputs, can only be raised by what the adapted blocks send into them. SAM (sharpness-aware minimisation)
first moves the code uphill by $\rho$, takes the gradient there, and steps from the original code with Adam
(the filter and SAM are SAR's update, which IMSE reuses).
**Step** adapts on the stream's next batch of 64, **Step × 10** on the next ten; **Reset** returns to the source
$\sigma$.
""",
    "domains": r"""
**4 · Domains and retrieval.** A batch's **descriptor** is its patch tokens' per-channel mean and variance; two
descriptors differ by $D = \mathrm{mean}_c\big[\tfrac{v_a + (\mu_a-\mu_b)^2}{2 v_b} +
\tfrac{v_b + (\mu_a-\mu_b)^2}{2 v_a} - 1\big]$ (a symmetric KL). IMSE asks two different questions with it.
**Detection** — *is this batch a new domain?* — compares the batch with the domain IMSE is adapting on now:
$D > \tau$ ends that domain. **Retrieval** — *which stored code is nearest?* — runs only when detection fires. The
bank's **slots** each hold one domain's descriptor and the code adapted on it (slot 0: the clean data's descriptor
and the source model's own code, $\sigma_0$, the $\sigma$ before any adaptation); top-1 retrieval brings back the
code of the slot with the smallest $D$ to the batch. (Here nothing was adapted, so every slot holds $\sigma_0$: the
view is about *which* slot.)
""",
}


def fill(text: str, **numbers) -> str:
    """A standing text with its run's numbers (``ADAPTED`` …) written in."""
    for name, value in numbers.items():
        text = text.replace(name, str(value))
    return text


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


# -- view 1 --------------------------------------------------------------------------------------------------------


def why_sigma(counts: dict[str, int], adapted_blocks: int) -> str:
    """Why σ and not LayerNorm or all weights, with the values each method adapts on this backbone."""
    blocks = f"blocks 0–{adapted_blocks - 1}" if adapted_blocks > 1 else "block 0"
    return (
        f"**Why σ, and not LayerNorm or all weights?** On this backbone IMSE adapts **{counts['imse']:,}** values "
        f"(the σ of {blocks}), TENT **{counts['tent']:,}** (every LayerNorm's scale and shift), SAR (the "
        f"baseline whose update IMSE reuses, view 3) **{counts['sar']:,}** (the LayerNorm scales and shifts of "
        f"{blocks}), and fine-tuning every weight would "
        f"adapt **{counts['all weights']:,}**. A σ only turns up or down a direction the source model learned "
        "($u_i$ and $v_i$ stay fixed), so whatever adaptation does, it re-weights the source model's own experts. "
        "LayerNorm's scale and shift act on each channel, not on the directions the layers learned, and free weights "
        "can learn new directions from a stream that has no labels: the freedom that entropy minimisation misuses "
        "when it collapses (view 2). Whether σ wins is measured here, not assumed: views 2 and 3 show where it does "
        "and where it does not."
    )


def experts_text(*, label: str, names: list[str], base: list[float], edited: list[float], edits: dict, scores: dict):
    """View 1's reading: the image's prediction unedited and edited, which edits the edited one includes, and the
    set's score unedited, with the k cut alone, and with both edits. ``edits``: k, scope, layer, rank, layers,
    expert, scale, held; ``scores``: measure, images, full, at_k, both."""
    best_base, best_edit = max(range(len(base)), key=base.__getitem__), max(range(len(edited)), key=edited.__getitem__)
    layer, k = f"`{edits['layer']}`", edits["k"]
    where = f"in {layer} only" if edits["scope"] == "this layer" else f"in every one of the {edits['layers']} layers"
    sigma = f"σ<sub>{edits['expert']}</sub> of {layer} × {edits['scale']:g} (that layer only, in either scope)"
    return (
        f"**{label}** — unedited: **{names[best_base]}** ({_pct(base[best_base])}). Edited: **{names[best_edit]}** "
        f"({_pct(edited[best_edit])}), with both edits at once: only the {k} largest experts kept {where}, and "
        f"{sigma}.\n\n"
        f"{scores['measure'].capitalize()} on {scores['images']}: unedited **{_pct(scores['full'])}** · the k cut "
        f"alone **{_pct(scores['at_k'])}** (the curve) · both edits **{_pct(scores['both'])}**. The "
        f"{min(k, edits['rank'])} largest experts of {layer} hold {_pct(edits['held'])} of its Σσ²."
    )


# -- view 2 --------------------------------------------------------------------------------------------------------


_NAMES = {
    "clean": "clean, unadapted",
    "corrupted": "corrupted, unadapted",
    "IMSE, λ_dm = 0": r"IMSE, $\lambda_{dm} = 0$",
}


def _named(condition: str) -> str:
    return _NAMES.get(condition, condition)


def _images(count: int) -> str:
    return f"{count} image{'' if abs(count) == 1 else 's'}"


def _best(view: CollapseView, best: str) -> str:
    base = view.correct("corrupted")
    if view.correct(best) <= base:
        return (
            f"No method beat the unadapted model ({_pct(view.accuracy['corrupted'])}) on these {view.measured} images."
        )
    gain = view.correct(best) - base
    noise = f": within {TIE_IMAGES}, too few to call a gain" if gain <= TIE_IMAGES else ""
    sentence = (
        f"Best: **{_named(best)}**, {_pct(view.accuracy[best])} against the unadapted model's "
        f"{_pct(view.accuracy['corrupted'])} (+{_images(gain)} of {view.measured}{noise})"
    )
    close = [c for c in view.adapted if c != best and view.correct(best) - view.correct(c) <= TIE_IMAGES]
    if close:
        sentence += f"; {' and '.join(_named(c) for c in close)} within {TIE_IMAGES} images of it, about a tie"
    return sentence + "."


def _collapse(view: CollapseView) -> tuple[str, list[str]]:
    collapsed = view.collapsed()
    base = view.top_share("corrupted")
    if not collapsed:
        return (
            f"Nothing collapsed: no method's top-class share rose {100 * COLLAPSE_RISE:.0f} points above the "
            f"unadapted model's {100 * base:.0f} %.",
            collapsed,
        )
    each = "; ".join(
        f"{_named(c)}'s top-class share rose from {100 * base:.0f} % to {100 * view.top_share(c):.0f} % (accuracy "
        f"{_pct(view.accuracy[c])})"
        for c in collapsed
    )
    return f"**Collapsed:** {each}.", collapsed


def _without_diversity(view: CollapseView) -> str:
    """What IMSE scored without its diversity term, read against IMSE: whether the term cost accuracy here."""
    ablated = "IMSE, λ_dm = 0"
    if ablated not in view.adapted:
        return ""
    gap = view.correct("IMSE") - view.correct(ablated)
    if gap < 0:
        verdict = f"so the diversity term cost IMSE {_images(-gap)} here"
    elif gap == 0:
        verdict = "the same: the diversity term neither helped IMSE nor held it back here"
    else:
        verdict = f"so the diversity term is not what held IMSE back (it helped, by {_images(gap)})"
    return f" Without it ({_named(ablated)}) IMSE scored {_pct(view.accuracy[ablated])}, {verdict}."


def _why_not_imse(view: CollapseView, best: str, collapsed: list[str]) -> str:
    """When IMSE is not the best (by any margin), says so and why, from the view's own numbers."""
    if "IMSE" not in view.adapted:
        return ""
    if best == "IMSE":
        if collapsed and "IMSE" not in collapsed:
            ablated = "IMSE, λ_dm = 0"
            without = (
                f"; without its diversity term, {100 * view.top_share(ablated):.0f} %"
                if ablated in view.adapted
                else ""
            )
            return (
                f" IMSE kept its predictions spread (top-class share {100 * view.top_share('IMSE'):.0f} %{without}) "
                f"where {' and '.join(_named(c) for c in collapsed)} collapsed."
            )
        return ""
    behind = view.correct(best) - view.correct("IMSE")
    gap = f"{_images(behind)} behind {_named(best)}" + (", about a tie" if behind <= TIE_IMAGES else "")
    if not collapsed:
        return (
            f" **IMSE did not win here** ({gap}), and no advantage is expected: nothing collapsed, so its diversity "
            "term, which exists to stop collapse, had nothing to prevent." + _without_diversity(view)
        )
    if "IMSE" in collapsed:
        return f" **IMSE did not win here** ({gap}): it collapsed too." + _without_diversity(view)
    return (
        f" **IMSE did not win here** ({gap}): {_named(best)} adapted further without collapsing."
        + _without_diversity(view)
    )


def collapse_verdict(view: CollapseView) -> str:
    """Which method did best, whether anything collapsed, and, when IMSE did not win, why."""
    if not view.adapted:
        return "The methods are adapting; the verdict comes with their first measurement."
    best = max(view.adapted, key=view.correct)  # a tie goes to the first in ADAPTED's order (IMSE)
    sentence, collapsed = _collapse(view)
    so_far = "" if view.finished else "So far: "
    return so_far + _best(view, best) + " " + sentence + _why_not_imse(view, best, collapsed)


def collapse_text(view: CollapseView) -> str:
    """View 2's reading: where corruption lowers the spread, the table, and the verdict."""
    lower = len(view.lower_when_corrupted)
    spread = f"Corruption lowers the mean std on {lower} of {len(view.layers)} layers" + (
        "." if lower == len(view.layers) else f"; on the other {len(view.layers) - lower} it does not."
    )
    rows = "\n".join(
        f"| {_named(c)} | {view.mean_std(c):.4f} | {_pct(view.accuracy[c])} | {100 * view.top_share(c):.0f} % |"
        for c in view.conditions
    )
    progress = "done" if view.finished else "adapting…"
    return (
        f"After **{view.images_adapted}** corrupted images of adaptation ({progress}), measured on {view.measured} "
        f"of them. {spread}\n\n| | mean std | accuracy | top-class share |\n|---|---|---|---|\n{rows}\n\n"
        + collapse_verdict(view)
    )


# -- view 3 --------------------------------------------------------------------------------------------------------


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _pull(report: StepReport, layers: int) -> str:
    """Why the diversity term's large value is not a large pull, and how hard and which way each term pulls."""
    pull, diversity = report.pull, report.diversity
    if pull.diversity is None:
        return "With λ<sub>dm</sub> = 0 only the entropy term pulls on σ."
    bigger = "" if report.entropy_term is None else f", far from the entropy term's {report.entropy_term:.2f},"
    start = (
        f"**The objective's values say little about what moves σ.** −λ<sub>dm</sub>·L<sub>dm</sub> is "
        f"{-report.lambda_dm * diversity:.2f}{bigger} because L<sub>dm</sub> sums the mean std of {layers} layers "
        f"(about {3 * diversity / layers:.3f} each) and divides by 3 blocks (here {diversity:.3f}), and λ<sub>dm</sub> "
        f"= {report.lambda_dm:g} multiplies it. But a constant added to a loss moves nothing: σ follows the gradient."
    )
    if pull.entropy is None:
        return start + " No sample is reliable on this batch, so only the diversity term pulls."
    ratio = pull.diversity / pull.entropy if pull.entropy else float("inf")
    if pull.cosine < -0.3:
        way = "mostly against it: the diversity term holds back what entropy minimisation would do"
    elif pull.cosine > 0.3:
        way = "mostly the same way: on this batch, both terms push σ alike"
    else:
        way = "nearly at right angles: the two terms move σ in different directions"
    return (
        f"{start} Here the diversity term's gradient is {ratio:.1f}× the entropy term's, and points {way} "
        f"(cosine {pull.cosine:+.2f})."
    )


def _stream(report: StepReport) -> str:
    tally = report.stream
    gain, band = tally.gain()
    if band is None:
        noise = "one batch: too few to tell gain from noise"
    elif abs(gain) <= band:
        noise = f"within noise: two standard errors of the per-batch difference are ±{band:.1f}"
    else:
        noise = f"beyond noise: two standard errors of the per-batch difference are ±{band:.1f}"
    return (
        f"**The stream so far** ({tally.images} images): IMSE **{_pct(tally.accuracy('adapted'))}**, Source "
        f"(unadapted) **{_pct(tally.accuracy('source'))}**: {gain:+.1f} points, {noise}."
    )


def step_text(report: StepReport, corruption: str, severity: int, layers: int) -> str:
    """View 3's reading of one step: the filter, the loss, the stream so far, the objective's pull, the table."""
    loss = "—" if report.loss is None else f"{report.loss:.4f}"
    perturbed = "—" if report.loss_perturbed is None else f"{report.loss_perturbed:.4f}"
    status = "updated" if report.updated else f"**no update** ({report.skip_reason})"
    passes = (report.batch - 1) // report.batches
    batches = report.batches
    where = f", pass {passes + 1} over the stream's {batches}" if passes else f" of the stream's {batches}"
    n = len(report.reliable)
    return (
        f"**Batch {report.batch}**{where} ({corruption.replace('_', ' ')} {severity}; a new stream starts when the "
        f"corruption or severity changes): {sum(report.reliable)} of {n} samples "
        f"reliable (H < E0 = {report.margin:.3f}); loss {loss} at the current code, {perturbed} at SAM's perturbed "
        f"code; {status}; the step changed {report.changed} of {n} predictions on this batch.\n\n"
        f"{_stream(report)}\n\n{_pull(report, layers)}\n\n"
        "**The table** lists the σ furthest from their source value σ₀ so far, largest |σ − σ₀| first. Adam "
        f"divides each gradient by its running size, so each step moves every σ by about ±lr = {report.lr:g} "
        "whatever the gradient's size: after one step every row ties, and after n steps the leaders are the σ whose "
        f"gradient kept its sign every time, near n × lr (here {report.batch} × lr = {report.batch * report.lr:.2g}). "
        "The relative column says how much that is for each σ."
    )


# -- view 4 --------------------------------------------------------------------------------------------------------


def _spoken(name: str) -> str:
    return name.replace("_", " ")


def domains_text(result: Retrieval, severity: int, tau: float) -> str:
    """View 4's reading: detection and retrieval told apart, and the map read against the KL."""
    incoming = f"**{_spoken(result.incoming)} {severity}**"
    from_clean = result.distances[0]
    if result.incoming == "clean":
        detection = f"**Detection:** clean data is slot 0's own domain (D = {from_clean:.4f})."
    elif from_clean > tau:
        detection = (
            f"**Detection:** if IMSE were adapting on clean data, this batch would be D = {from_clean:.3g} away, over "
            f"τ = {tau:g}: detection fires, a new domain starts, and retrieval runs."
        )
    else:
        detection = (
            f"**Detection:** if IMSE were adapting on clean data, this batch would be D = {from_clean:.3g} away, under "
            f"τ = {tau:g}: no new domain, so IMSE would keep adapting its current code and retrieve nothing."
        )
    firing = [_spoken(name) for name, d in zip(result.stored[1:], result.distances[1:]) if d > tau]
    if firing and result.incoming != "clean":
        detection += f" Coming from {_and(firing)} instead (D > τ from their slots), detection would fire."
    nearest = result.stored[result.slot]
    if result.incoming == nearest:
        verdict = "the code stored for the same corruption"
    elif result.incoming in result.stored:
        verdict = "another domain's code, although this corruption has a slot of its own"
    else:
        verdict = "another domain's code: this corruption is not in the bank"
    retrieval = (
        f"**Retrieval,** when detection fires: slot {result.slot}, **{_spoken(nearest)}** "
        f"(D = {result.distances[result.slot]:.3g}), {verdict}."
    )
    if result.map_slot != result.slot:
        retrieval += (
            f" On the map, slot {result.map_slot} ({_spoken(result.stored[result.map_slot])}) looks nearer: the map is "
            "a 2-D approximation of the KL, and retrieval reads the KL itself (the bars below)."
        )
    return f"A new batch of {incoming} (this view's own choice). {detection}\n\n{retrieval}"
