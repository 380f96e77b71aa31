"""The Teach tab: four views of why IMSE works, each a Gradio handler that checks its inputs, asks
``imse.runs.explain`` for the numbers and ``teach_viz`` for the figures (no maths here).

Views are wired by name (``imse.app.teach_tab``): a view's keyword-only parameters are named after the widgets
it reads, and it answers with a dict keyed by the widgets it writes, which ``@answers(...)`` declares once.

Models are shared between visitors (one cached, decomposed backbone per name) and never written to: view 1 edits
σ through a per-call context, views 2 and 3 adapt private copies.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import gradio as gr
import torch

from imse.app import teach_data, teach_viz
from imse.app.ui import as_int, as_number, check_backbone
from imse.core.spectral import spectral_layers
from imse.data.corruptions import CORRUPTIONS
from imse.data.models import BUILTIN, BackboneUnavailable
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import lab_settings, tuned_settings
from imse.runs.explain import experts
from imse.runs.explain.collapse import CollapseView, collapse_progress
from imse.runs.explain.domains import domain_map, retrieve
from imse.runs.explain.step import StepExplorer

__all__ = [
    "answers",
    "clear_caches",
    "collapse_layer",
    "collapse_view",
    "domains_view",
    "experts_view",
    "on_backbone",
    "step_reset",
    "step_view",
]

MAX_SCALE = 3.0  # the σ-scale slider's range
DOMAIN_BATCH = 64  # view 4: one batch per domain, as the shift detector sees them
# view 2: rounds × steps of batch 32 (768 images), measured on 128 images after each round (~2 s a round, 2 cores)
COLLAPSE_ROUNDS, COLLAPSE_STEPS, COLLAPSE_BATCH, COLLAPSE_MEASURED = 12, 2, 32, 128
SCOPES = ("this layer", experts.ALL_LAYERS)


def answers(*outputs: str) -> Callable:
    """Declares the widgets a view writes, by name: the keys of the dict it returns (or yields, for a stream).
    What it reads is its keyword-only parameters, named after their widgets; ``teach_tab`` wires both."""

    def declare(view: Callable) -> Callable:
        view.outputs = outputs
        return view

    return declare


def _backbone(name: Any):
    try:
        return teach_data.spectral_backbone(check_backbone(name))
    except (BackboneUnavailable, ValueError, RuntimeError) as error:
        raise gr.Error(str(error)) from None


def _image(backbone_name: str, sample: Any, upload: Any) -> tuple[torch.Tensor, str]:
    backbone = teach_data.spectral_backbone(backbone_name)
    if upload:
        try:
            return teach_data.load_user_image(str(upload), backbone.input_size), "your image"
        except (ValueError, OSError) as error:  # OSError: a vanished or unreadable upload
            message = str(error) if isinstance(error, ValueError) else "the uploaded file could not be read"
            raise gr.Error(message) from None
    samples = teach_data.sample_images(backbone_name)
    labels = [label for _, label in samples]
    return samples[labels.index(sample) if sample in labels else 0]


# -- inputs --------------------------------------------------------------------------------------------------------


def _layer(backbone, layer: Any) -> str:
    if not isinstance(layer, str) or layer not in spectral_layers(backbone):
        raise gr.Error(f"unknown layer {str(layer)[:80]!r}")
    return layer


def _in_range(value: Any, name: str, low: float, high: float, whole: bool = False):
    """A Teach widget's number within [low, high], read by the Lab's rules (``ui.as_int``, ``ui.as_number``): a
    whole number refuses 3.7 rather than taking it as 3, and nobody's check takes a checkbox for a number."""
    number = as_int(value, name) if whole else as_number(value, name)
    if not low <= number <= high:  # also refuses NaN
        raise gr.Error(f"{name} must be {low:g} to {high:g}")
    return number


def _corruption(name: Any, severity: Any) -> tuple[str, int]:
    if name not in CORRUPTIONS:
        raise gr.Error(f"unknown corruption {str(name)[:40]!r}")
    severity = as_int(severity, "severity")
    if not 1 <= severity <= 5:
        raise gr.Error("severity must be 1 to 5")
    return name, severity


def layer_ranks(backbone_name: str = BUILTIN) -> dict[str, int]:
    """The backbone's spectral layers and how many experts each has."""
    return {name: layer.rank for name, layer in spectral_layers(teach_data.spectral_backbone(backbone_name)).items()}


def diversity_layers(backbone_name: str = BUILTIN) -> list[str]:
    return CollapseMeter(teach_data.spectral_backbone(backbone_name)).layers


@answers("layer", "k", "expert", "sample", "collapse_layer")
def on_backbone(*, backbone: Any) -> dict:
    """Switching backbones: its layers, the experts' range, its sample images (hub models load here)."""
    layers = spectral_layers(_backbone(backbone))
    first = next(iter(layers))
    samples = [label for _, label in teach_data.sample_images(backbone)]
    collapse_layers = diversity_layers(backbone)
    return {
        "layer": gr.update(choices=list(layers), value=first),
        "k": gr.update(maximum=layers[first].rank, value=layers[first].rank),
        "expert": gr.update(maximum=layers[first].rank - 1, value=0),
        "sample": gr.update(choices=samples, value=samples[0]),
        "collapse_layer": gr.update(choices=collapse_layers, value=collapse_layers[-1]),
    }


def clear_caches() -> None:
    """Forget every view's remembered answers (the backbones stay loaded): what a fresh server would compute."""
    _ACCURACY.clear()
    _COLLAPSE_DONE.clear()
    _domains.cache_clear()


# -- view 1: spectral experts ------------------------------------------------------------------------------------


_ACCURACY: dict[tuple[str, str, int], float] = {}  # (backbone, scope, k) -> accuracy on the fixed set
CURVE_KS = (1, 4, 16, 64)  # the curve's first points (plus the full rank), computed once per scope


def _accuracy_keeping(backbone_name: str, scope_layer: str, k: int) -> float:
    """Accuracy (or agreement) on the fixed set with the k largest experts kept, remembered: a slider that comes
    back to a k, and the curve, cost nothing the second time."""
    key = (backbone_name, scope_layer, k)
    if key not in _ACCURACY:
        backbone = teach_data.spectral_backbone(backbone_name)
        images, labels, _ = teach_data.eval_set(backbone_name)
        sigmas = experts.keep_largest(backbone, k, scope_layer) if k else None  # k = 0: every expert, unedited
        if len(_ACCURACY) > 4096:
            _ACCURACY.clear()
        _ACCURACY[key] = experts.accuracy(backbone, images, labels, sigmas)
    return _ACCURACY[key]


def _curve(backbone_name: str, scope_layer: str, rank: int) -> list[tuple[int, float]]:
    """The grid's points and every k tried so far in this scope, sorted by k."""
    for k in (*CURVE_KS, rank):
        if k <= rank:
            _accuracy_keeping(backbone_name, scope_layer, k)
    tried = {k: acc for (name, scope, k), acc in _ACCURACY.items() if (name, scope) == (backbone_name, scope_layer)}
    return sorted((k, acc) for k, acc in tried.items() if 0 < k <= rank)


@answers("experts_text", "spectrum_plot", "rank_plot", "top5_base", "top5_edited", "preview")
def experts_view(
    *, backbone: Any, layer: Any, scope: Any, k: Any, expert: Any, scale: Any, sample: Any = None, upload: Any = None
) -> dict:
    """View 1: the layer's spectrum, accuracy keeping the k largest experts, and one image's prediction with the
    k largest kept and expert i's σ scaled (both edits together). ``sample``: a sample image's label; ``upload``:
    the path of the visitor's own image, which wins over the sample."""
    model = _backbone(backbone)
    layer = _layer(model, layer)
    module = spectral_layers(model)[layer]
    if scope not in SCOPES:
        raise gr.Error(f"scope must be one of {', '.join(SCOPES)}")
    scope_layer = layer if scope == SCOPES[0] else experts.ALL_LAYERS
    largest_rank = max(m.rank for m in spectral_layers(model).values())
    k = _in_range(k, "k", 1, largest_rank, whole=True)
    expert = _in_range(expert, "expert", 0, module.rank - 1, whole=True)
    scale = _in_range(scale, "scale", 0.0, MAX_SCALE)
    image, label = _image(backbone, sample, upload)

    sigmas = experts.keep_largest(model, k, scope_layer)  # holds ``layer`` in either scope
    sigmas[layer][expert] *= scale
    fixed, _, measure = teach_data.eval_set(backbone)
    rank = largest_rank if scope_layer == experts.ALL_LAYERS else module.rank
    full = _accuracy_keeping(backbone, scope_layer, 0)
    at_k = _accuracy_keeping(backbone, scope_layer, min(k, rank))
    curve = _curve(backbone, scope_layer, rank)
    names = model.class_names
    base = experts.probabilities(model, image[None])[0].tolist()
    edited = experts.probabilities(model, image[None], sigmas)[0].tolist()
    best_base, best_edit = max(range(len(base)), key=base.__getitem__), max(range(len(edited)), key=edited.__getitem__)
    kept = set(torch.topk(module.S.detach(), min(k, module.rank)).indices.tolist())
    energy = experts.energy(module.S)
    held = float(energy[min(k, module.rank) - 1])
    text = (
        f"**{label}** — all experts: **{names[best_base]}** ({100 * base[best_base]:.1f} %); keeping the {k} largest "
        f"({scope}) with σ_{expert} × {scale:g}: **{names[best_edit]}** ({100 * edited[best_edit]:.1f} %). "
        f"The {min(k, module.rank)} largest experts of `{layer}` hold {100 * held:.1f} % of its Σσ²; "
        f"{measure} on {len(fixed)} images with k = {k}: {100 * at_k:.1f} % (all experts: {100 * full:.1f} %)."
    )
    return {
        "experts_text": text,
        "spectrum_plot": teach_viz.spectrum_figure(module.S.tolist(), energy.tolist(), layer, kept, expert),
        "rank_plot": teach_viz.rank_figure(curve, full, k=min(k, rank), at_k=at_k, scope=scope, images=len(fixed)),
        "top5_base": teach_viz.top5_figure(base, names, "top-5, all experts"),
        "top5_edited": teach_viz.top5_figure(edited, names, f"top-5, k = {k}, σ_{expert} × {scale:g}"),
        "preview": image.permute(1, 2, 0).numpy(),
    }


# -- view 2: collapse, measured ----------------------------------------------------------------------------------


def method_settings(backbone_name: str) -> dict[str, dict]:
    """The Lab's tuned settings for the methods the views adapt with (one place: imse.runs.defaults)."""
    return {name: tuned_settings(backbone_name, name) for name in ("imse", "tent")}


_COLLAPSE_DONE: dict[tuple, CollapseView] = {}  # finished views by (backbone, corruption, severity); a few at most


COLLAPSE_OUTPUTS = ("collapse_state", "collapse_text", "collapse_experts_plot", "collapse_layers_plot",
                    "collapse_history_plot", "predictions_plot")  # fmt: skip


def _collapse_outputs(view: CollapseView, layer: Any, names: list[str]) -> dict:
    if layer not in view.layers:
        layer = view.layers[-1]
    lower = len(view.lower_when_corrupted)
    verdict = f"Under this corruption the mean std drops on {lower} of {len(view.layers)} layers" + (
        "." if lower == len(view.layers) else f"; on the other {len(view.layers) - lower} it does not drop."
    )
    rows = "\n".join(
        f"| {c} | {view.mean_std(c):.4f} | {100 * view.accuracy[c]:.1f} % | {100 * view.top_share(c):.0f} % |"
        for c in view.conditions
    )
    progress = "done" if view.finished else "adapting…"
    text = (
        f"{verdict} After **{view.images_adapted}** corrupted images of adaptation ({progress}), measured on "
        f"{sum(view.class_counts['clean'])} images:\n\n"
        "| | mean std | accuracy | top class share |\n|---|---|---|---|\n" + rows
    )
    return {
        "collapse_state": view,
        "collapse_text": text,
        "collapse_experts_plot": teach_viz.collapse_experts_figure(view, layer),
        "collapse_layers_plot": teach_viz.collapse_layers_figure(view),
        "collapse_history_plot": teach_viz.collapse_history_figure(view),
        "predictions_plot": teach_viz.predictions_figure(view, names),
    }


@answers(*COLLAPSE_OUTPUTS)
def collapse_view(*, backbone: Any, corruption: Any, severity: Any, collapse_layer: Any):
    """View 2, streamed: clean vs corrupted first (≤ 2 s), then the three methods adapting a few batches at a
    time, each update re-measured; a finished view is kept, so coming back to it is instant."""
    model = _backbone(backbone)
    corruption, severity = _corruption(corruption, severity)
    key = (backbone, corruption, severity)
    if key in _COLLAPSE_DONE:
        yield _collapse_outputs(_COLLAPSE_DONE[key], collapse_layer, model.class_names)
        return
    images, labels = teach_data.view_images(backbone)
    views = collapse_progress(
        model,
        images,
        labels,
        corruption,
        severity,
        rounds=COLLAPSE_ROUNDS,
        steps_per_round=COLLAPSE_STEPS,
        batch_size=COLLAPSE_BATCH,
        measured=COLLAPSE_MEASURED,
        settings=method_settings(backbone),
    )
    for view in views:
        if view.finished:
            while len(_COLLAPSE_DONE) >= 8:
                _COLLAPSE_DONE.pop(next(iter(_COLLAPSE_DONE)))
            _COLLAPSE_DONE[key] = view
        yield _collapse_outputs(view, collapse_layer, model.class_names)


@answers(*COLLAPSE_OUTPUTS)
def collapse_layer(*, collapse_state: Any, backbone: Any, collapse_layer: Any) -> dict:
    """Another layer of the view on screen (``collapse_state``, what view 2 measured; nothing recomputed)."""
    if not isinstance(collapse_state, CollapseView):
        raise gr.Error("press Measure first")
    return _collapse_outputs(collapse_state, collapse_layer, _backbone(backbone).class_names)


# -- view 3: one IMSE step, dissected ----------------------------------------------------------------------------


STEP_OUTPUTS = ("explorer", "step_text", "entropy_plot", "loss_plot", "moved_table", "step_predictions_plot")


def _explorer(explorer: Any, backbone: Any, corruption: Any, severity: Any) -> tuple:
    """The session's explorer (a private IMSE copy), rebuilt when the backbone, corruption or severity changed."""
    _backbone(backbone)
    corruption, severity = _corruption(corruption, severity)
    key = (backbone, corruption, severity)
    if isinstance(explorer, tuple) and explorer[0] == key:
        return explorer
    images, labels = teach_data.view_images(backbone)
    settings = method_settings(backbone)["imse"]
    model = teach_data.spectral_backbone(backbone)
    return key, StepExplorer(model, images, labels, corruption, severity, **settings)


@answers(*STEP_OUTPUTS)
def step_view(*, explorer: Any, backbone: Any, corruption: Any, severity: Any) -> dict:
    """View 3: one more IMSE step on the next corrupted batch (``explorer``: the session's, None at first)."""
    explorer = _explorer(explorer, backbone, corruption, severity)
    _, corruption, severity = explorer[0]  # as checked by _explorer
    report = explorer[1].step()
    names = teach_data.spectral_backbone(backbone).class_names
    moved = [[layer, index, f"{delta:+.2e}", f"{before:.4f}"] for layer, index, delta, before in report.moved]
    status = "updated" if report.updated else f"**no update** ({report.skip_reason})"
    loss = "—" if report.loss is None else f"{report.loss:.4f}"
    perturbed = "—" if report.loss_perturbed is None else f"{report.loss_perturbed:.4f}"
    text = (
        f"Batch {report.batch} of {corruption.replace('_', ' ')} {severity}: {sum(report.reliable)} of "
        f"{len(report.reliable)} samples under E0 = {report.margin:.3f}; loss {loss} at the current code, "
        f"{perturbed} at SAM's perturbed code (SAM steps from the worse point); {status}."
    )
    return {
        "explorer": explorer,
        "step_text": text,
        "entropy_plot": teach_viz.sample_entropy_figure(report),
        "loss_plot": teach_viz.loss_figure(report),
        "moved_table": moved,
        "step_predictions_plot": teach_viz.step_predictions_figure(report, names),
    }


@answers(*STEP_OUTPUTS)
def step_reset(*, explorer: Any, backbone: Any, corruption: Any, severity: Any) -> dict:
    """Back to the source σ (S0) and the first batch; the panels clear until the next Step."""
    explorer = _explorer(explorer, backbone, corruption, severity)
    explorer[1].reset()
    text = "Back to the source σ (S0), nothing adapted: **Step** adapts on the first batch again."
    cleared = {"entropy_plot": None, "loss_plot": None, "moved_table": [], "step_predictions_plot": None}
    return {"explorer": explorer, "step_text": text, **cleared}


# -- view 4: domains and retrieval -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _domains(backbone_name: str, severity: int):
    images, _ = teach_data.view_images(backbone_name)
    tau = lab_settings(backbone=backbone_name)["tau"]
    return domain_map(
        teach_data.spectral_backbone(backbone_name), images[:DOMAIN_BATCH], list(CORRUPTIONS), severity, tau=tau
    )


@answers("domains_text", "kl_plot", "map_plot", "retrieval_plot")
def domains_view(*, backbone: Any, severity: Any, stored: Any, incoming: Any) -> dict:
    """View 4: descriptors' KL matrix and map, and which slot a bank holding ``stored`` gives a new batch."""
    model = _backbone(backbone)
    incoming, severity = _corruption(incoming, severity)
    stored = list(stored or [])
    if any(name not in CORRUPTIONS for name in stored):
        raise gr.Error("the bank can hold only corruptions from the list")
    domains = _domains(backbone, severity)
    images, _ = teach_data.view_images(backbone)
    result = retrieve(model, domains, stored, incoming, images[DOMAIN_BATCH : 2 * DOMAIN_BATCH], severity=severity)
    nearest = result.stored[result.slot].replace("_", " ")
    right = incoming in stored and result.stored[result.slot] == incoming
    verdict = (
        "the code stored for the same corruption"
        if right
        else ("another domain's code: this corruption is not in the bank" if incoming not in stored else "another code")
    )
    novelty = "a new domain" if result.shift_from_clean else "not a new domain"
    text = (
        f"A new batch of **{incoming.replace('_', ' ')} {severity}** is {novelty} seen from clean data "
        f"(τ = {domains.tau:g}); "
        f"top-1 retrieval brings back slot {result.slot}, **{nearest}** — {verdict}."
    )
    return {
        "domains_text": text,
        "kl_plot": teach_viz.kl_figure(domains),
        "map_plot": teach_viz.domain_map_figure(domains, result),
        "retrieval_plot": teach_viz.retrieval_figure(result, domains.tau),
    }
