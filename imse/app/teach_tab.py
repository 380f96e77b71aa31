"""The Teach tab's layout and wiring: ``teach_tab(demo)`` lays it out inside the page's Blocks and wires its views.

Wired by name, never by position: the widgets live in one dict by name, and each view (``imse.app.teach``) reads
the widgets its keyword-only parameters are named after and writes those its ``@answers(...)`` declares
(``wire``). Building the layout is cheap: the built-in backbone's layers and ranks come from its config
(``builtin_layers``); the page's first load computes the first views.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import gradio as gr

from imse.app import teach, teach_data
from imse.app.teach_text import INTRO, LATEX, TEACH_TEXT, fill
from imse.app.ui import backbone_choices
from imse.core.bank import DESCRIPTOR_MOMENTUM
from imse.core.methods import METHODS
from imse.core.spectral import DEFAULT_TARGETS, TARGET_PATHS
from imse.data.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS
from imse.data.models import BUILTIN, builtin_config
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import lab_settings, swept_values, tuned_settings
from imse.runs.explain.collapse import COLLAPSE_RISE

__all__ = ["LATEX", "TAB_NAME", "TEACH_TEXT", "builtin_layers", "teach_tab", "warm_up", "wire"]

Widgets = dict[str, gr.components.Component]
TAB_NAME = "Teach: how IMSE works"
_CORRUPTION_CHOICES = [(name.replace("_", " "), name) for name in CORRUPTIONS]  # shown with spaces, sent by name


def builtin_layers() -> tuple[dict[str, int], list[str]]:
    """The built-in backbone's spectral layers with their ranks, and view 2's layers, read from its config.json:
    no timm, no weights, no SVD while the page is laid out. A target of timm's ``Block`` is an ``nn.Linear``
    (qkv: d → 3d, proj: d → d, fc1: d → h, fc2: h → d, h = int(d · mlp_ratio)) inside ``Backbone.model``; its rank
    is min(in, out). ``tests/test_teach.py`` checks both against the decomposed model
    (``teach.layer_ranks``, ``teach.diversity_layers``)."""
    architecture = builtin_config()["architecture"]
    depth, width = architecture["depth"], architecture["embed_dim"]
    hidden = int(width * architecture["mlp_ratio"])
    features = {"qkv": (width, 3 * width), "proj": (width, width), "fc1": (width, hidden), "fc2": (hidden, width)}
    names = {
        (block, target): f"model.blocks.{block}.{TARGET_PATHS[target]}"
        for block in range(depth)
        for target in DEFAULT_TARGETS
    }
    measured = inspect.signature(CollapseMeter).parameters["blocks"].default  # the last blocks view 2 measures
    ranks = {name: min(features[target]) for (_, target), name in names.items()}
    return ranks, [name for (block, _), name in names.items() if block >= depth - measured]


# -- wiring by name --------------------------------------------------------------------------------------------


def _by_widget(view: Callable, widgets: Widgets) -> Callable:
    """The view as Gradio calls it: the same keyword arguments, its answers keyed by the widgets themselves (a
    dict keyed by output components is one of Gradio's return forms), every answer exactly the declared names."""

    def keyed(answer: dict) -> dict:
        if answer.keys() != set(view.outputs):
            raise RuntimeError(f"{view.__name__} answered {sorted(answer)}, not its declared {sorted(view.outputs)}")
        return {widgets[name]: value for name, value in answer.items()}

    if inspect.isgeneratorfunction(view):  # a streamed view stays a stream

        @functools.wraps(view)
        def stream(**values):
            for answer in view(**values):
                yield keyed(answer)

        return stream

    @functools.wraps(view)
    def handler(**values):
        return keyed(view(**values))

    return handler


def wire(trigger: Callable, view: Callable, widgets: Widgets, **options):
    """One event: ``view`` reads the widgets named by its keyword-only parameters and writes the widgets its
    ``@answers`` names (``teach.answers``), all looked up in ``widgets`` by name."""
    reads = {name: widgets[name] for name in inspect.signature(view).parameters}
    writes = [widgets[name] for name in view.outputs]
    return trigger(_by_widget(view, widgets), outputs=writes, inputs_kwargs=reads, api_name=False, **options)


def _wire(demo: gr.Blocks, w: Widgets) -> None:
    wire(w["backbone"].change, teach.on_backbone, w)
    for name in ("layer", "scope", "sample", "upload", "k", "expert", "scale", "backbone"):
        wire(w[name].change, teach.experts_view, w, trigger_mode="always_last")
    wire(w["measure"].click, teach.collapse_view, w)
    wire(w["collapse_layer"].change, teach.collapse_layer, w)
    wire(w["step_button"].click, teach.step_view, w)
    wire(w["steps_button"].click, teach.step_many, w)
    wire(w["reset_button"].click, teach.step_reset, w)
    for trigger in (w["stored"].change, w["incoming"].change, w["severity"].release, w["backbone"].change):
        wire(trigger, teach.domains_view, w)
    wire(demo.load, teach.experts_view, w)  # the page's first load computes the first views (the SVD included)
    wire(demo.load, teach.domains_view, w)


# -- layout --------------------------------------------------------------------------------------------------------


def _controls(w: Widgets) -> None:
    depth = builtin_config()["architecture"]["depth"]
    adapted = depth - teach.DIVERSITY_BLOCKS
    gr.Markdown(fill(INTRO, ADAPTED=f"0–{adapted - 1}" if adapted > 1 else "0", DEPTH=depth))
    with gr.Row():
        w["backbone"] = gr.Dropdown(backbone_choices(), value=BUILTIN, label="Backbone (every view)", scale=2)
        w["corruption"] = gr.Dropdown(
            _CORRUPTION_CHOICES,
            value="contrast",
            label="Corruption (views 2 and 3, read on Measure and Step; view 4 picks its own)",
        )
        w["severity"] = gr.Slider(1, 5, value=3, step=1, label="Severity (views 2–4)")


def _markdown(elem_id: str) -> gr.Markdown:
    """A view's reading, with the same inline LaTeX as its standing text."""
    return gr.Markdown(elem_id=elem_id, latex_delimiters=LATEX)


def _experts_tab(w: Widgets, ranks: dict[str, int]) -> None:
    layers = list(ranks)
    samples = [label for _, label in teach_data.sample_images()]
    with gr.Tab("1 · Spectral experts"):
        gr.Markdown(TEACH_TEXT["experts"], latex_delimiters=LATEX)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                w["layer"] = gr.Dropdown(layers, value=layers[0], label="Layer")
                w["scope"] = gr.Radio(
                    list(teach.SCOPES),
                    value=teach.SCOPES[0],
                    label="Keep the k largest experts in",
                    info=f"the cut's scope: this layer cuts only the chosen layer; every layer cuts all {len(layers)} "
                    "(each block's qkv, proj, fc1, fc2). Either way the σ scale below edits the chosen layer only.",
                )
                w["k"] = gr.Slider(1, max(ranks.values()), value=ranks[layers[0]], step=1, label="k")
                w["expert"] = gr.Slider(0, ranks[layers[0]] - 1, value=0, step=1, label="Expert i (from 0)")
                w["scale"] = gr.Slider(
                    0.0, teach.MAX_SCALE, value=1.0, step=0.05, label="Scale σᵢ of the chosen layer by"
                )
                w["sample"] = gr.Radio(samples, value=samples[0], label="Sample image")
                w["upload"] = gr.Image(type="filepath", label="…or upload one (PNG/JPEG/WebP, ≤ 10 MB)", height=140)
                w["preview"] = gr.Image(label="The image the model sees", height=240, interactive=False)
            with gr.Column(scale=3):
                w["experts_text"] = _markdown("teach-experts-text")
                with gr.Row():
                    w["spectrum_plot"] = gr.Plot(label="Spectrum")
                    w["rank_plot"] = gr.Plot(label="Accuracy keeping k experts")
                with gr.Row():
                    w["top5_base"] = gr.Plot(label="Top-5, unedited")
                    w["top5_edited"] = gr.Plot(label="Top-5, edited")
                w["why_sigma"] = _markdown("teach-why-sigma")


def _collapse_tab(w: Widgets, collapse_layers: list[str]) -> None:
    with gr.Tab("2 · Collapse, measured"):
        adapted = teach.COLLAPSE_ROUNDS * teach.COLLAPSE_STEPS * teach.COLLAPSE_BATCH
        text = fill(TEACH_TEXT["collapse"], ADAPTED=adapted, MEASURED=teach.COLLAPSE_MEASURED,
                    RISE=f"{100 * COLLAPSE_RISE:.0f}", LAYERS=len(collapse_layers),
                    PERIMAGE=f"{100 / teach.COLLAPSE_MEASURED:.1f}")  # fmt: skip
        gr.Markdown(text, latex_delimiters=LATEX)
        with gr.Row():
            w["collapse_layer"] = gr.Dropdown(
                collapse_layers, value=collapse_layers[-1], label="Layer (the per-expert plot)", scale=2
            )
            w["measure"] = gr.Button("Measure", variant="primary")
        w["collapse_state"] = gr.State()
        w["collapse_text"] = _markdown("teach-collapse-text")
        with gr.Row():
            w["collapse_experts_plot"] = gr.Plot(label="Per expert")
            w["collapse_layers_plot"] = gr.Plot(label="Per layer")
        with gr.Row():
            w["collapse_history_plot"] = gr.Plot(label="While adapting")
            w["predictions_plot"] = gr.Plot(label="Predicted classes")


def _step_tab(w: Widgets, layers: int) -> None:
    with gr.Tab("3 · IMSE, step by step"):
        imse = {**METHODS["imse"].defaults, **tuned_settings(BUILTIN, "imse")}
        tried = ", ".join(f"{float(v):g}" for v in swept_values(BUILTIN, "imse", "lambda_dm")) or "its default alone"
        held_out = ", ".join(name.replace("_", " ") for name in VALIDATION_CORRUPTIONS)
        text = fill(TEACH_TEXT["step"], LAYERS=layers, RHO=f"{imse['rho']:g}", LAMBDA=f"{imse['lambda_dm']:g}",
                    HELDOUT=held_out, TRIED=tried)  # fmt: skip
        gr.Markdown(text, latex_delimiters=LATEX)
        w["explorer"] = gr.State()
        with gr.Row():
            w["step_button"] = gr.Button("Step", variant="primary")
            w["steps_button"] = gr.Button(f"Step × {teach.STEPS_AT_ONCE}", variant="primary")
            w["reset_button"] = gr.Button("Reset")
        w["step_text"] = _markdown("teach-step-text")
        with gr.Row():
            w["stream_plot"] = gr.Plot(label="The stream so far")
            w["loss_plot"] = gr.Plot(label="Objective")
        w["moved_table"] = gr.Dataframe(  # its own row: beside a plot, its last column was cut off at 1400 px
            headers=teach.MOVED_HEADERS, label="The σ furthest from the source σ so far", interactive=False
        )
        w["entropy_plot"] = gr.Plot(label="Entropy filter")


def _domains_tab(w: Widgets) -> None:
    with gr.Tab("4 · Domains and retrieval"):
        tau = lab_settings(backbone=BUILTIN)["tau"]
        gr.Markdown(
            fill(TEACH_TEXT["domains"], TAU=f"τ = {tau:g}", MOMENTUM=f"{DESCRIPTOR_MOMENTUM:g}"), latex_delimiters=LATEX
        )
        with gr.Row():
            w["stored"] = gr.Dropdown(
                _CORRUPTION_CHOICES,
                value=["gaussian_noise", "defocus_blur", "snow", "contrast"],
                multiselect=True,
                label="Stored in the bank, slots 1, 2, … (slot 0 always holds clean data and the source σ)",
                scale=3,
            )
            w["incoming"] = gr.Dropdown(_CORRUPTION_CHOICES, value="snow", label="A new batch of (this view only)")
        w["domains_text"] = _markdown("teach-domains-text")
        with gr.Row():
            w["kl_plot"] = gr.Plot(label="KL between domains")
            w["map_plot"] = gr.Plot(label="Domain map")
        w["retrieval_plot"] = gr.Plot(label="Retrieval")


def teach_tab(demo: gr.Blocks) -> Widgets:
    """The Teach tab, laid out inside ``demo`` (call it within its ``with gr.Blocks()``) and wired by name;
    returns its widgets by name."""
    ranks, collapse_layers = builtin_layers()
    widgets: Widgets = {}
    with gr.Tab(TAB_NAME):
        _controls(widgets)
        _experts_tab(widgets, ranks)
        _collapse_tab(widgets, collapse_layers)
        _step_tab(widgets, len(collapse_layers))
        _domains_tab(widgets)
        _wire(demo, widgets)
    return widgets


def warm_up(widgets: Widgets) -> None:
    """The first views a page loads, computed once with the widgets' opening values when the server starts (not
    at import: ``python app.py`` runs it before it serves), so that the first visitor's Teach tab answers at once:
    the backbone's SVD, the accuracy-keeping-k curve and the domain map are then cached (about 3 s on 2 cores)."""
    for view in (teach.experts_view, teach.domains_view):
        view(**{name: widgets[name].value for name in inspect.signature(view).parameters})
