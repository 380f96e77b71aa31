"""The Teach tab's words: each view's standing text (with its formula), and the sentences that read a view's own
numbers back to the visitor (view 3's live in ``imse.app.teach_step_text``). Every word is defined where it is first
used (code, slot, top-class share, reliable, E0 …), experts are numbered from 0, largest σ first, everywhere, and a
result is read as it came out: when IMSE does not win, the text says so and why. Markdown with ``$…$`` LaTeX
(``LATEX``); no numbers are computed here."""

from __future__ import annotations

from imse.runs.explain.collapse import COLLAPSE_RISE, CollapseView
from imse.runs.explain.domains import Retrieval

__all__ = [
    "INTRO",
    "LATEX",
    "TEACH_TEXT",
    "collapse_text",
    "domains_text",
    "experts_text",
    "spoken",
    "why_sigma",
]

LATEX = [{"left": "$", "right": "$", "display": False}]
INTRO = (
    "**Test-time adaptation** (TTA): a trained model (the **source** model) keeps adjusting itself, without labels, "
    "on the test images it is asked to classify, here images from another **domain** than it was trained on: "
    "corrupted by noise, blur, weather or lost contrast, at a **severity** from 1 (mild) to 5 (strong; a level is not"
    " comparable across corruptions). The images come as a **stream** of batches, and the model predicts each batch, "
    "then adapts on it. The usual signal is the model's own confidence: lower the entropy of its predictions "
    "(**TENT**, a standard baseline, does this to every LayerNorm's scale and shift). Its risk is **collapse**: "
    "predictions crowding into a few classes. **IMSE** (Intrinsic Mixture of Spectral Experts; **the paper**: Baek et"
    " al., *Intrinsic Mixture of Spectral Experts Fine-tuning for Test-Time Adaptation*, ICLR 2026, with its authors'"
    " **official code**, baek85/IMSE) adapts only the singular values σ of the linear layers (the attention's qkv, "
    "which makes queries, keys and values, and proj, its output; the MLP's fc1 and fc2) of every block but the last "
    "three (on the built-in ViT: blocks ADAPTED of DEPTH), and adds a term that keeps the features diverse. Four "
    "views, on the backbone you pick, show how it works and measure where it helps and where it does not; each number"
    " says which edits or which images it includes, and experts are numbered from 0, largest σ first, in every view "
    "and formula."
)

TEACH_TEXT = {
    "experts": r"""
**1 · Spectral experts.** SVD splits each linear layer of the blocks (qkv, proj, fc1, fc2; the patch embedding and the
classifier head are not split) into rank-1 *experts*, $W = U\,\mathrm{diag}(\sigma)\,V^\top = \sum_{i=0}^{r-1}
\sigma_i\, u_i v_i^\top$: expert $i$ (from 0, largest $\sigma_i$ first) writes along $u_i$, scaled by $\sigma_i$, as
much as the input points along $v_i$. Keeping only the $k$ largest gives the rank-$k$ weight closest to $W$ (in the
Frobenius and spectral norms: Eckart–Young), which need not be the best accuracy, nor grow with $k$: the curve
measures accuracy (top-1: the most probable class is the right one) at the marked $k$ only. Their **energy share** is
their $\sum \sigma_i^2$ over the whole layer's (their part of $\lVert W \rVert_F^2$). IMSE adapts only the $\sigma_i$.
Every adapted layer's $\sigma$ vector, together, is the model's **code**: what IMSE adapts, stores and brings back. The
code before any adaptation is the **source σ**, $\sigma^{src}$.
""",
    "collapse": r"""
**2 · Collapse, measured.** An expert's *alignment* with an input row $x_n$ is $a_{n,i} = v_i^\top x_n / \lVert x_n
\rVert$, and $\mathrm{Std}_i$ its standard deviation over every token of every image together (variation within an image
and between images both count). A layer's **mean std** averages $\mathrm{Std}_i$ over its experts but the one whose std
is largest, as $L_{dm}$ does (view 3); this view reads the LAYERS layers where $L_{dm}$ is read. It is the paper's sign
of diverse features, not specific to IMSE (TENT and SAR can raise it too) and not a measure of collapse, which shows in
the predictions: the **top-class share** is the share of images given the most-predicted class (10 % when 10 classes are
balanced, 100 % when every image gets the same class). Corruption alone can already crowd the predictions; collapse
*from adaptation* is the share rising RISE percentage points (**points**) or more over the unadapted model's on the same
images: a stated rule, not a test (one image moves a share of MEASURED by PERIMAGE point). **Measure** adapts IMSE, IMSE
without its diversity term ($\lambda_{dm} = 0$, view 3), **SAR** and TENT on ADAPTED images of the tab's corruption and
severity (other test images than view 1's), then scores each final model, and the unadapted model clean and corrupted,
on MEASURED of those same images: accuracy after adapting, a different number from view 3's, where each batch is
predicted before the model adapts on it. A difference counts when it is over two standard errors of the paired
difference, per image (+1, 0 or −1, as each model got it right or not): the image is the unit because one fixed model
answers independent images. Std axes start at 0, or show a change in % against the corrupted, unadapted model.
""",
    "step": r"""
**3 · IMSE, step by step.** A sample is **reliable** when its prediction's entropy $H(x) = -\sum_c p_c \ln p_c$ is under
$E_0 = 0.4 \ln C$ ($C$ classes): only those enter the entropy term. The loss is $\mathcal{L} = \tfrac{1}{|R|}\sum_{x \in
R} H(x) \;-\; \lambda_{dm} L_{dm}$ over the reliable set $R$, with $L_{dm} = \tfrac{1}{3}\sum_{\ell} \mathrm{mean}_{i
\neq i^\ast_\ell}\,\mathrm{Std}_i^{(\ell)}$: the sum over the LAYERS layers $\ell$ of the last three blocks, divided by
3 blocks (the official code's scale: 4 × the layers' mean). $L_{dm}$ reads every token of **every** sample, reliable or
not, and leaves out each layer's expert $i^\ast_\ell$ whose std is largest: that one varies most already, and the mean
is about the experts that could go flat. The last three blocks' $\sigma$ stay at $\sigma^{src}$: the official code's
design choice (SAR leaves the same blocks unadapted). With all three frozen, $L_{dm}$ (an alignment $v_i^\top x/\lVert
x\rVert$ does not depend on its own layer's $\sigma$) rises only through what the adapted blocks send in: a consequence
of the freezing, not its reason. **SAM** (sharpness-aware minimisation) moves the code uphill along the gradient by
$\rho$ = RHO (the L2 norm of that move over all adapted σ together), takes the gradient there, and steps from the
original code with **Adam**, an optimiser that divides each gradient by a running average of its size, at a learning
rate **lr** chosen on four corruptions held out of every test (HELDOUT); there $\lambda_{dm}$ = TRIED scored within
noise of each other, and the official default LAMBDA was kept. The filter and SAM are SAR's update (SAR steps with plain
gradient descent, **SGD**), which IMSE reuses. **Step** adapts on the stream's next batch of 64, **Step × 10** on the
next ten; **Reset** returns to $\sigma^{src}$.
""",
    "domains": r"""
**4 · Domains and retrieval.** A batch's **descriptor** is the per-channel mean and variance of its *patch tokens* (each
image patch's embedding; the class token, the extra token the head reads, left out) where they enter block 0, so no code
changes it; two descriptors differ by $D = \mathrm{mean}_c\big[\tfrac{v_a + (\mu_a-\mu_b)^2}{2 v_b} + \tfrac{v_b +
(\mu_a-\mu_b)^2}{2 v_a} - 1\big]$ (a symmetric KL). IMSE asks two questions with it. **Detection** — *is this batch a
new domain?* — compares the batch with the domain IMSE is adapting on now, whose descriptor is a running average
(MOMENTUM old, the rest new, each full batch): $D > \tau$ (TAU, the official default) ends that domain, which is then
stored. **Retrieval** — *which stored code is nearest?* — runs only when detection fires, and brings back the nearest
slot's code however far it is (a new domain starts from $\sigma^{src}$ only when slot 0 is the nearest), with
Adam's state reset. The bank's **slots**
each hold one domain's descriptor and the code adapted on it; slot 0 holds the clean data's and $\sigma^{src}$. Here the
bank is the one you choose below, one batch of 64 per domain at the tab's severity, and every slot holds $\sigma^{src}$:
the view shows *which* slot comes back, not what retrieval gains (the Lab tab's continual run, one stream through many
corruptions in turn, measures that).
""",
}


def fill(text: str, **numbers) -> str:
    """A standing text with its run's numbers (``ADAPTED`` …) written in."""
    for name, value in numbers.items():
        text = text.replace(name, str(value))
    return text


def _pct(share: float, digits: int = 1) -> str:
    return f"{100 * share:.{digits}f} %"


def _p(probability: float) -> str:
    """A probability, written apart from the accuracies (which are in %)."""
    return f"p = {probability:.2f}"


# -- view 1 --------------------------------------------------------------------------------------------------------


def why_sigma(counts: dict[str, int], adapted_blocks: int) -> str:
    """Why σ and not LayerNorm or all weights, with the values each method adapts on this backbone, and what the
    tab does and does not measure of that argument."""
    blocks = f"blocks 0–{adapted_blocks - 1}" if adapted_blocks > 1 else "block 0"
    return (
        "**The argument for σ, rather than LayerNorm or all weights.** "
        f"On this backbone IMSE adapts **{counts['imse']:,}** values "
        f"(the σ of {blocks}), TENT **{counts['tent']:,}** (every LayerNorm's scale and shift), **SAR** "
        f"**{counts['sar']:,}** (the LayerNorm scales and shifts of {blocks}; SAR is the baseline whose sample filter "
        f"and SAM IMSE reuses, view 3), and fine-tuning every weight would adapt **{counts['all weights']:,}**. A σ "
        "only turns up or down a direction the source model learned ($u_i$ and $v_i$ stay fixed), so adapting it can "
        "only re-weight the source model's own experts; LayerNorm's scale and shift act on each channel, whatever "
        "directions the layers learned, and free weights can learn new directions from a stream with no labels to "
        "check them. That is the argument; view 2 measures part of it. SAR against IMSE without its diversity term "
        "is σ against LayerNorm under the same sample filter and SAM step (view 3), though the optimisers differ "
        "(view 3: SAR's SGD, IMSE's Adam); TENT differs in what it adapts *and* in how (every sample's entropy). "
        "Fine-tuning every weight is not measured here."
    )


def experts_text(*, label: str, names: list[str], base: list[float], edited: list[float], edits: dict, scores: dict):
    """View 1's reading: the image's prediction unedited and edited, which edits the edited one includes, and the
    set's score unedited, with the k cut alone, and with both edits. ``edits``: k, scope, layer, rank, layers,
    expert, scale, held; ``scores``: measure, images, full, at_k, both."""
    best_base, best_edit = max(range(len(base)), key=base.__getitem__), max(range(len(edited)), key=edited.__getitem__)
    layer, k = f"`{edits['layer']}`", edits["k"]
    where = f"in {layer} only" if edits["scope"] == "this layer" else f"in every one of the {edits['layers']} layers"
    sigma = f"expert {edits['expert']}'s σ in {layer} × {edits['scale']:g} (that layer only, in either scope)"
    unscaled = "" if edits["scale"] == 1 else ", of its σ before the scale"
    dips = ""
    if scores["dips"]:  # named, so the plot can be checked: (k, accuracy) of the smaller k, then of the larger
        (k_small, small), (k_large, large) = scores["dips"]
        dips = (
            f" k = {k_large} scored {_pct(large)}, below k = {k_small}'s {_pct(small)}: accuracy need not grow with k."
        )
    return (
        f"**{label}** — unedited: **{names[best_base]}** ({_p(base[best_base])}). Edited: **{names[best_edit]}** "
        f"({_p(edited[best_edit])}), with both edits at once: only the {k} largest experts kept {where}, and "
        f"{sigma}.\n\n"
        f"{scores['measure'].capitalize()} on {scores['images']}: unedited **{_pct(scores['full'])}** · the k cut "
        f"alone **{_pct(scores['at_k'])}** (the curve) · both edits **{_pct(scores['both'])}**. The "
        f"{min(k, edits['rank'])} largest experts of {layer} hold {_pct(edits['held'])} of its Σσ² (energy "
        f"share{unscaled}).{dips}"
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


def _noise(view: CollapseView, condition: str, against: str) -> str:
    """A paired difference with its band, read: "±4 images: within noise" or "±4 images: beyond noise"."""
    _, band = view.paired(condition, against)
    if band == 0:
        return "the same answer on every image"
    return f"±{band:.1f} images: {'beyond' if view.beyond_noise(condition, against) else 'within'} noise"


def _best(view: CollapseView, best: str) -> str:
    gain, _ = view.paired(best, "corrupted")
    if gain <= 0:
        return (
            f"No method beat the unadapted model ({_pct(view.accuracy['corrupted'])}) on these {view.measured} images."
        )
    lead = "Best" if view.beyond_noise(best, "corrupted") else "Highest, though not beyond noise"
    sentence = (
        f"{lead}: **{_named(best)}**, {_pct(view.accuracy[best])} against the unadapted model's "
        f"{_pct(view.accuracy['corrupted'])}: +{_images(gain)} of {view.measured} "
        f"({_noise(view, best, 'corrupted')})"
    )
    close = [c for c in view.adapted if c != best and not view.beyond_noise(best, c)]
    if close:
        each = ", ".join(
            f"{_named(c)} {_images(view.paired(best, c)[0])} behind ({_noise(view, best, c)})" for c in close
        )
        sentence += f"; {each}, about a tie"
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
    gap, _ = view.paired("IMSE", ablated)
    if gap == 0:
        verdict = "the same score as IMSE in this one run: no effect of the diversity term on accuracy measured here"
    elif not view.beyond_noise("IMSE", ablated):
        verdict = f"{_images(abs(gap))} {'ahead of' if gap < 0 else 'behind'} IMSE, within noise"
    elif gap < 0:
        verdict = f"so the diversity term cost IMSE {_images(-gap)} here"
    else:
        verdict = f"so the diversity term is not what held IMSE back (it helped, by {_images(gap)})"
    return f" Without it ({_named(ablated)}) IMSE scored {_pct(view.accuracy[ablated])}: {verdict}."


def _imse_held(view: CollapseView, collapsed: list[str]) -> str:
    """IMSE kept its share where another method collapsed: credited to the diversity term only if IMSE without it
    collapsed (the view measures that twin), not otherwise."""
    shares = "; ".join(f"{_named(c)} {_pct(view.top_share(c), 0)}" for c in view.adapted if c not in collapsed)
    ablated = "IMSE, λ_dm = 0"
    if ablated not in view.adapted:
        credit = ""
    elif ablated in collapsed:
        credit = " Without its diversity term IMSE collapsed too: here the term is what held it."
    else:
        credit = (
            " Without its diversity term IMSE did not collapse either (top-class share "
            f"{_pct(view.top_share(ablated), 0)}, unadapted {_pct(view.top_share('corrupted'), 0)}): in this one run, "
            "the 10-point rule cannot credit the term with IMSE not collapsing."
        )
    return (
        f" Where {' and '.join(_named(c) for c in collapsed)} collapsed, the others did not (top-class share: "
        f"{shares}; unadapted {_pct(view.top_share('corrupted'), 0)}).{credit}"
    )


def _why_not_imse(view: CollapseView, best: str, collapsed: list[str]) -> str:
    """When IMSE is not the best (by any margin), says so and why, from the view's own numbers."""
    if "IMSE" not in view.adapted:
        return ""
    if best == "IMSE":
        if not collapsed or "IMSE" in collapsed:
            return ""
        return _imse_held(view, collapsed)
    behind, _ = view.paired(best, "IMSE")
    if not collapsed:
        why = ". Nothing collapsed, so the diversity term, which exists to stop collapse, was not put to the test here."
    else:
        why = ": it collapsed too." if "IMSE" in collapsed else f": {_named(best)} adapted further without collapsing."
    gap = f"{_images(behind)} behind {_named(best)}, {_noise(view, best, 'IMSE')}"
    return f" **IMSE did not win here** ({gap}){why}" + _without_diversity(view)


def collapse_verdict(view: CollapseView) -> str:
    """Which method did best, whether anything collapsed, and, when IMSE did not win, why."""
    if not view.adapted:
        return "The methods are adapting; the verdict comes with their first measurement."
    best = max(view.adapted, key=view.correct)  # a tie goes to the first in ADAPTED's order (IMSE)
    sentence, collapsed = _collapse(view)
    so_far = "" if view.finished else "So far: "
    return so_far + _best(view, best) + " " + sentence + _why_not_imse(view, best, collapsed) + _sigma_or_norm(view)


def _sigma_or_norm(view: CollapseView) -> str:
    """σ against LayerNorm under the same filter and SAM: IMSE without its diversity term against SAR."""
    ablated = "IMSE, λ_dm = 0"
    if not {ablated, "SAR"} <= set(view.adapted):
        return ""
    gap, _ = view.paired(ablated, "SAR")
    ahead = "the same score" if gap == 0 else f"{_images(abs(gap))} {'ahead of' if gap > 0 else 'behind'} SAR"
    return (
        f" **σ or LayerNorm,** under the same filter and SAM: {_named(ablated)} {_pct(view.accuracy[ablated])} "
        f"(top-class share {100 * view.top_share(ablated):.0f} %), SAR {_pct(view.accuracy['SAR'])} "
        f"({100 * view.top_share('SAR'):.0f} %): {ahead} ({_noise(view, ablated, 'SAR')})."
    )


def _blocks(layers: list[str]) -> str:
    """The blocks ``layers`` (``…blocks.N.…``) belong to: "blocks 3–5"."""
    numbers = sorted({int(name.split("blocks.")[1].split(".")[0]) for name in layers})
    return f"block {numbers[0]}" if len(numbers) == 1 else f"blocks {numbers[0]}–{numbers[-1]}"


def collapse_text(view: CollapseView) -> str:
    """View 2's reading: what corruption costs, where it lowers the mean std, the table, and the verdict."""
    lower, layers = len(view.lower_when_corrupted), len(view.layers)
    cost, _ = view.paired("clean", "corrupted")
    spread = (
        f"Corruption alone costs the unadapted model {_images(cost)} ({_pct(view.accuracy['clean'])} clean, "
        f"{_pct(view.accuracy['corrupted'])} corrupted; {_noise(view, 'clean', 'corrupted')}) and lowers the mean "
        f"std on {lower} of the {layers} layers of {_blocks(view.layers)} (the last three, where "
        "L<sub>dm</sub> is read: IMSE and SAR leave them frozen, TENT adapts their LayerNorms)"
        + ("." if lower == layers else f"; on the other {layers - lower} it does not.")
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


def _joined(names: list[str], word: str = "or") -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" {word} " + names[-1]


# -- view 4 --------------------------------------------------------------------------------------------------------


def spoken(name: str) -> str:
    """A registry name as a visitor reads it (``gaussian_noise``: gaussian noise)."""
    return name.replace("_", " ")


def domains_text(result: Retrieval, severity: int, tau: float, near_clean: list[str] = ()) -> str:
    """View 4's reading: detection and retrieval told apart, retrieval beyond τ, the map read against the KL.
    ``near_clean``: the stored corruptions within τ of the clean data (a stream from clean would not detect them)."""
    incoming = f"**{spoken(result.incoming)} {severity}**"
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
            f"τ = {tau:g}: no new domain (τ cannot tell it from clean data on this model), so IMSE would keep adapting "
            "its current code and retrieve nothing."
        )
    firing = [spoken(name) for name, d in zip(result.stored[1:], result.distances[1:]) if d > tau]
    if firing and result.incoming != "clean":
        detection += f" Coming from {_joined(firing)} instead (D > τ from their slots), detection would fire."
    nearest = result.stored[result.slot]
    if result.incoming == nearest:
        verdict = "the code stored for the same corruption"
    elif result.incoming in result.stored:
        verdict = "another domain's code, although this corruption has a slot of its own"
    else:
        verdict = "another domain's code: this corruption is not in the bank"
    nearest_d = result.distances[result.slot]
    retrieval = (
        f"**Retrieval,** when detection fires: slot {result.slot}, **{spoken(nearest)}** (D = {nearest_d:.3g}), "
        f"{verdict}."
    )
    if nearest_d > tau:
        retrieval += (
            " Even this nearest slot is over τ: no stored domain is this one, yet retrieval brings back the nearest "
            "slot's code all the same, and IMSE adapts on from there."
        )
    if result.map_slot != result.slot:
        retrieval += (
            f" On the map, slot {result.map_slot} ({spoken(result.stored[result.map_slot])}) looks nearer: the map is "
            "a 2-D approximation of the KL, and retrieval reads the KL itself (the dots below, one per slot)."
        )
    if near_clean:
        retrieval += (
            f" In a stream that came from clean data, {_joined([spoken(n) for n in near_clean], 'and')}"
            " (within τ of clean) would not have been detected, so would not have got a slot that way: this bank is "
            "chosen, not grown."
        )
    return f"A new batch of {incoming} (this view's own choice). {detection}\n\n{retrieval}"
