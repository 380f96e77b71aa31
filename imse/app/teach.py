"""The Teach tab: four views of how IMSE works, each a Gradio handler that checks its inputs, asks
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

from imse.app import teach_data, teach_map, teach_step_text, teach_text, teach_viz
from imse.app.ui import as_int, as_number, check_backbone
from imse.core.methods import METHODS
from imse.core.spectral import find_vit, spectral_layers
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
    "step_many",
    "step_reset",
    "step_view",
]

MAX_SCALE = 3.0  # the σ-scale slider's range
DOMAIN_BATCH = 64  # view 4: one batch per domain, as the shift detector sees them
# view 2: rounds × steps of batch 32 (768 images), measured on 128 images after each round (4 methods: ~1.6 s a
# round on 2 quiet cores)
COLLAPSE_ROUNDS, COLLAPSE_STEPS, COLLAPSE_BATCH, COLLAPSE_MEASURED = 12, 2, 32, 128
SCOPES = ("this layer", experts.ALL_LAYERS)
PREVIEW_PX = 224  # view 1 shows the model's input at least this large
DIVERSITY_BLOCKS = METHODS["imse"].defaults["diversity_blocks"]  # IMSE's last blocks: frozen, carrying L_dm


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
    _EDITED.clear()
    _COLLAPSE_DONE.clear()
    _domains.cache_clear()


# -- view 1: spectral experts ------------------------------------------------------------------------------------


_ACCURACY: dict[tuple[str, str, int], float] = {}  # (backbone, scope, k) -> accuracy on the fixed set
_EDITED: dict[tuple, float] = {}  # (backbone, scope, k, layer, expert, scale) -> the same, σ_i scaled too
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


def _accuracy_edited(backbone_name: str, sigmas: dict[str, torch.Tensor], key: tuple) -> float:
    """Accuracy on the fixed set with both edits (the k cut and the scaled σ), remembered by ``key``."""
    if key not in _EDITED:
        images, labels, _ = teach_data.eval_set(backbone_name)
        if len(_EDITED) > 4096:
            _EDITED.clear()
        _EDITED[key] = experts.accuracy(teach_data.spectral_backbone(backbone_name), images, labels, sigmas)
    return _EDITED[key]


@lru_cache(maxsize=4)
def _why_sigma(backbone_name: str) -> str:
    """The paragraph on why σ, with the values each method adapts on this backbone (built once per backbone)."""
    model = teach_data.spectral_backbone(backbone_name)
    counts = experts.trainable_counts(model, method_settings(backbone_name))
    _, vit = find_vit(model)
    return teach_text.why_sigma(counts, len(vit.blocks) - DIVERSITY_BLOCKS)


def _preview(image: torch.Tensor, side: int = PREVIEW_PX) -> Any:
    """The image as the model sees it, enlarged by a whole factor (nearest neighbour: each pixel a square) to at
    least ``side`` pixels, so a 32-px image can be seen."""
    factor = max(1, -(-side // max(image.shape[-2:])))
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1).permute(1, 2, 0).numpy()


@answers("experts_text", "why_sigma", "spectrum_plot", "rank_plot", "top5_base", "top5_edited", "preview")
def experts_view(
    *, backbone: Any, layer: Any, scope: Any, k: Any, expert: Any, scale: Any, sample: Any = None, upload: Any = None
) -> dict:
    """View 1: the layer's spectrum, accuracy keeping the k largest experts, and one image's prediction with the
    k largest kept and expert i's σ scaled (both edits together). ``sample``: a sample image's label; ``upload``:
    the path of the visitor's own image, which wins over the sample."""
    model = _backbone(backbone)
    layer = _layer(model, layer)
    layers = spectral_layers(model)
    module = layers[layer]
    if scope not in SCOPES:
        raise gr.Error(f"scope must be one of {', '.join(SCOPES)}")
    scope_layer = layer if scope == SCOPES[0] else experts.ALL_LAYERS
    largest_rank = max(m.rank for m in layers.values())
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
    both = at_k if scale == 1 else _accuracy_edited(backbone, sigmas, (backbone, scope_layer, k, layer, expert, scale))
    curve = _curve(backbone, scope_layer, rank)
    names = model.class_names
    base = experts.probabilities(model, image[None])[0].tolist()
    edited = experts.probabilities(model, image[None], sigmas)[0].tolist()
    kept = set(torch.topk(module.S.detach(), min(k, module.rank)).indices.tolist())
    energy = experts.energy(module.S)
    edits = dict(k=k, scope=scope, layer=layer, rank=module.rank, layers=len(layers), expert=expert, scale=scale,
                 held=float(energy[min(k, module.rank) - 1]))  # fmt: skip
    images = f"the {len(fixed)} {'labelled test images' if measure == 'accuracy' else 'sample photos'}"
    dips = next(((a, b) for a, b in zip(curve, curve[1:]) if b[1] < a[1]), None)  # the first larger k to score lower
    scores = dict(measure=measure, images=images, full=full, at_k=at_k, both=both, dips=dips)
    edited_title = f"top-5, k = {k} ({scope}), σ<sub>{expert}</sub> × {scale:g}"
    return {
        "experts_text": teach_text.experts_text(
            label=label, names=names, base=base, edited=edited, edits=edits, scores=scores
        ),  # fmt: skip
        "why_sigma": _why_sigma(backbone),
        "spectrum_plot": teach_viz.spectrum_figure(
            module.S.tolist(),
            energy.tolist(),
            layer,
            kept=kept,
            scaled=expert,
            scale=scale,
            edited=float(sigmas[layer][expert]),
        ),  # fmt: skip
        "rank_plot": teach_viz.rank_figure(curve, full, k=min(k, rank), at_k=at_k, scope=scope, images=len(fixed)),
        "top5_base": teach_viz.top5_figure(base, names, "top-5, unedited"),
        "top5_edited": teach_viz.top5_figure(edited, names, edited_title),
        "preview": _preview(image),
    }


# -- view 2: collapse, measured ----------------------------------------------------------------------------------


def method_settings(backbone_name: str) -> dict[str, dict]:
    """The Lab's tuned settings for the methods the views adapt with (one place: imse.runs.defaults)."""
    return {name: tuned_settings(backbone_name, name) for name in ("imse", "sar", "tent")}


_COLLAPSE_DONE: dict[tuple, CollapseView] = {}  # finished views by (backbone, corruption, severity); a few at most


COLLAPSE_OUTPUTS = ("collapse_state", "collapse_text", "collapse_experts_plot", "collapse_layers_plot",
                    "collapse_history_plot", "predictions_plot")  # fmt: skip


def _collapse_outputs(view: CollapseView, layer: Any, names: list[str]) -> dict:
    if layer not in view.layers:
        layer = view.layers[-1]
    return {
        "collapse_state": view,
        "collapse_text": teach_text.collapse_text(view),
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


# -- view 3: IMSE, step by step ---------------------------------------------------------------------------------


STEP_OUTPUTS = ("explorer", "step_text", "entropy_plot", "loss_plot", "moved_table", "stream_plot")
STEPS_AT_ONCE = 10  # "Step × 10"
MOVED_HEADERS = ["layer", "expert", "source σ", "σ − source σ", "relative (% of source σ)", "last step",
                 "steps the same way as its total change"]  # fmt: skip


def _explorer(explorer: Any, backbone: Any, corruption: Any, severity: Any) -> tuple:
    """The session's explorer (a private IMSE copy), rebuilt when the backbone, corruption or severity changed."""
    _backbone(backbone)
    corruption, severity = _corruption(corruption, severity)
    key = (backbone, corruption, severity)
    if isinstance(explorer, tuple) and explorer[0] == key:
        return explorer
    images, labels = teach_data.stream_images(backbone)
    settings = method_settings(backbone)["imse"]
    model = teach_data.spectral_backbone(backbone)
    return key, StepExplorer(model, images, labels, corruption, severity, **settings)


def _step_outputs(explorer: tuple) -> dict:
    """One more step of the session's explorer, read."""
    _, corruption, severity = explorer[0]
    report = explorer[1].step()
    moved = [
        [teach_viz.short_layer(m.layer), m.expert, f"{m.source:.4f}", f"{m.since_source:+.2e}",
         "tiny σ" if m.tiny else f"{100 * m.relative:+.1f} %", f"{m.last_step:+.2e}",
         f"{m.steps_this_way}/{report.batch}"]
        for m in report.moved
    ]  # fmt: skip
    return {
        "explorer": explorer,
        "step_text": teach_step_text.step_text(report, corruption, severity, len(explorer[1].method.diversity_layers)),
        "entropy_plot": teach_viz.sample_entropy_figure(report),
        "loss_plot": teach_viz.loss_figure(report),
        "moved_table": gr.update(value=moved, headers=MOVED_HEADERS),
        "stream_plot": teach_viz.stream_figure(report),
    }


@answers(*STEP_OUTPUTS)
def step_view(*, explorer: Any, backbone: Any, corruption: Any, severity: Any) -> dict:
    """View 3: one more IMSE step on the stream's next batch (``explorer``: the session's, None at first)."""
    return _step_outputs(_explorer(explorer, backbone, corruption, severity))


@answers(*STEP_OUTPUTS)
def step_many(*, explorer: Any, backbone: Any, corruption: Any, severity: Any):
    """View 3, streamed: ``STEPS_AT_ONCE`` more steps, each answered as it is taken."""
    explorer = _explorer(explorer, backbone, corruption, severity)
    for _ in range(STEPS_AT_ONCE):
        yield _step_outputs(explorer)


@answers(*STEP_OUTPUTS)
def step_reset(*, explorer: Any, backbone: Any, corruption: Any, severity: Any) -> dict:
    """Back to the source σ (S0) and the stream's first batch; the panels clear until the next Step."""
    explorer = _explorer(explorer, backbone, corruption, severity)
    explorer[1].reset()
    text = "Back to the source σ, nothing adapted: **Step** adapts on the stream's first batch again."
    cleared = {"entropy_plot": None, "loss_plot": None, "moved_table": [], "stream_plot": None}
    return {"explorer": explorer, "step_text": text, **cleared}


# -- view 4: domains and retrieval -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _domains(backbone_name: str, severity: int):
    images, _ = teach_data.view_images(backbone_name)
    tau = lab_settings(backbone=backbone_name)["tau"]
    return domain_map(
        teach_data.spectral_backbone(backbone_name), images[:DOMAIN_BATCH], list(CORRUPTIONS), severity, tau=tau
    )


def _near_clean(domains, stored: list[str]) -> list[str]:
    """The stored corruptions whose descriptor is within τ of the clean data's."""
    clean = domains.kl[domains.names.index("clean")]
    within = [name for name in domains.names if clean[domains.names.index(name)] <= domains.tau]
    return [name for name in dict.fromkeys(stored) if name != "clean" and name in within]


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
    return {
        "domains_text": teach_text.domains_text(result, severity, domains.tau, _near_clean(domains, stored)),
        "kl_plot": teach_map.kl_figure(domains),
        "map_plot": teach_map.domain_map_figure(domains, result),
        "retrieval_plot": teach_map.retrieval_figure(result, domains.tau),
    }
