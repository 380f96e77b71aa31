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
from imse.app.ui import backbone_choices
from imse.core.spectral import DEFAULT_TARGETS, TARGET_PATHS
from imse.data.corruptions import CORRUPTIONS
from imse.data.models import BUILTIN, builtin_config
from imse.runs.collapse import CollapseMeter

__all__ = ["LATEX", "TEACH_TEXT", "builtin_layers", "teach_tab", "warm_up", "wire"]

# The Teach tab's path: each view's 2–4 sentences and the formula of what it draws
TEACH_TEXT = {
    "experts": r"""
**1 · Spectral experts.** SVD splits every linear layer into rank-1 experts,
$W = U\,\mathrm{diag}(\sigma)\,V^\top = \sum_i \sigma_i\, u_i v_i^\top$: expert $i$ writes along $u_i$, scaled by
$\sigma_i$, as much as the input points along $v_i$. Keeping only the $k$ largest gives the best rank-$k$ layer;
slide $k$ down to see how few experts carry the model, and scale one $\sigma_i$ to see what it does. IMSE adapts
only the $\sigma_i$ — a few thousand numbers.
""",
    "collapse": r"""
**2 · Collapse, measured.** An expert's *alignment* with input row $x_n$ (every token of every image) is
$a_{n,i} = v_i^\top x_n / \lVert x_n\rVert$, and $\mathrm{Std}_i$ its spread over the batch: an expert whose
alignment no longer varies has stopped telling images apart. **Measure** compares clean images, the same images
corrupted, and IMSE, IMSE without its diversity term ($\lambda_{dm}=0$) and TENT as they adapt on 768 corrupted
images. Watch the spread and the predicted classes; the view says where corruption does *not* lower the spread.
""",
    "step": r"""
**3 · One IMSE step, dissected.** Samples with entropy $H(x) < E_0 = 0.4 \ln C$ are kept; the loss is
$\mathcal{L} = \tfrac{1}{|R|}\sum_{x \in R} H(x) \;-\; \lambda_{dm} L_{dm}$ with
$L_{dm} = \tfrac{1}{3}\sum_{\ell} \mathrm{mean}_{i>1}\,\mathrm{Std}_i^{(\ell)}$ over the last three blocks.
SAM first moves $\sigma$ uphill by $\rho$, takes the gradient there, and steps from the original point with Adam,
whose first steps move each $\sigma$ by about the learning rate (the sign says which way).
**Step** adapts on the next batch; **Reset** returns to the source $\sigma$.
""",
    "domains": r"""
**4 · Domains and retrieval.** A batch's descriptor is its patch tokens' per-channel mean and variance; two
descriptors differ by $D = \mathrm{mean}_c\big[\tfrac{v_a + (\mu_a-\mu_b)^2}{2 v_b} +
\tfrac{v_b + (\mu_a-\mu_b)^2}{2 v_a} - 1\big]$, and $D > \tau$ starts a new domain. IMSE keeps the $\sigma$ it
adapted for each domain in a bank and, on a new domain, brings back the slot whose descriptor is nearest.
""",
}
LATEX = [{"left": "$", "right": "$", "display": False}]

Widgets = dict[str, gr.components.Component]


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
    wire(w["reset_button"].click, teach.step_reset, w)
    for trigger in (w["stored"].change, w["incoming"].change, w["severity"].release, w["backbone"].change):
        wire(trigger, teach.domains_view, w)
    wire(demo.load, teach.experts_view, w)  # the page's first load computes the first views (the SVD included)
    wire(demo.load, teach.domains_view, w)


# -- layout --------------------------------------------------------------------------------------------------------


def _controls(w: Widgets) -> None:
    with gr.Row():
        w["backbone"] = gr.Dropdown(backbone_choices(), value=BUILTIN, label="Backbone", scale=2)
        w["corruption"] = gr.Dropdown(list(CORRUPTIONS), value="contrast", label="Corruption (views 2–4)")
        w["severity"] = gr.Slider(1, 5, value=3, step=1, label="Severity (views 2–4)")


def _experts_tab(w: Widgets, ranks: dict[str, int]) -> None:
    layers = list(ranks)
    samples = [label for _, label in teach_data.sample_images()]
    with gr.Tab("1 · Spectral experts"):
        gr.Markdown(TEACH_TEXT["experts"], latex_delimiters=LATEX)
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                w["layer"] = gr.Dropdown(layers, value=layers[0], label="Layer")
                w["scope"] = gr.Radio(list(teach.SCOPES), value=teach.SCOPES[0], label="Keep the k largest experts in")
                w["k"] = gr.Slider(1, max(ranks.values()), value=ranks[layers[0]], step=1, label="k")
                w["expert"] = gr.Slider(0, ranks[layers[0]] - 1, value=0, step=1, label="Expert i")
                w["scale"] = gr.Slider(0.0, teach.MAX_SCALE, value=1.0, step=0.05, label="Scale σ_i by")
                w["sample"] = gr.Radio(samples, value=samples[0], label="Sample image")
                w["upload"] = gr.Image(type="filepath", label="…or upload one (PNG/JPEG/WebP, ≤ 10 MB)", height=140)
                w["preview"] = gr.Image(label="The image the model sees", height=110, interactive=False)
            with gr.Column(scale=3):
                w["experts_text"] = gr.Markdown(elem_id="teach-experts-text")
                with gr.Row():
                    w["spectrum_plot"] = gr.Plot(label="Spectrum")
                    w["rank_plot"] = gr.Plot(label="Accuracy keeping k experts")
                with gr.Row():
                    w["top5_base"] = gr.Plot(label="Top-5, all experts")
                    w["top5_edited"] = gr.Plot(label="Top-5, edited")


def _collapse_tab(w: Widgets, collapse_layers: list[str]) -> None:
    with gr.Tab("2 · Collapse, measured"):
        gr.Markdown(TEACH_TEXT["collapse"], latex_delimiters=LATEX)
        with gr.Row():
            w["collapse_layer"] = gr.Dropdown(collapse_layers, value=collapse_layers[-1], label="Layer", scale=2)
            w["measure"] = gr.Button("Measure", variant="primary")
        w["collapse_state"] = gr.State()
        w["collapse_text"] = gr.Markdown(elem_id="teach-collapse-text")
        with gr.Row():
            w["collapse_experts_plot"] = gr.Plot(label="Per expert")
            w["collapse_layers_plot"] = gr.Plot(label="Per layer")
        with gr.Row():
            w["collapse_history_plot"] = gr.Plot(label="While adapting")
            w["predictions_plot"] = gr.Plot(label="Predicted classes")


def _step_tab(w: Widgets) -> None:
    with gr.Tab("3 · One IMSE step"):
        gr.Markdown(TEACH_TEXT["step"], latex_delimiters=LATEX)
        w["explorer"] = gr.State()
        with gr.Row():
            w["step_button"] = gr.Button("Step", variant="primary")
            w["reset_button"] = gr.Button("Reset")
        w["step_text"] = gr.Markdown(elem_id="teach-step-text")
        with gr.Row():
            w["entropy_plot"] = gr.Plot(label="Entropy filter")
            w["loss_plot"] = gr.Plot(label="Objective")
        with gr.Row():
            w["moved_table"] = gr.Dataframe(
                headers=["layer", "expert", "Δσ", "σ before"], label="Experts whose σ moved most", interactive=False
            )
            w["step_predictions_plot"] = gr.Plot(label="Predictions")


def _domains_tab(w: Widgets) -> None:
    with gr.Tab("4 · Domains and retrieval"):
        gr.Markdown(TEACH_TEXT["domains"], latex_delimiters=LATEX)
        with gr.Row():
            w["stored"] = gr.Dropdown(
                list(CORRUPTIONS),
                value=["gaussian_noise", "defocus_blur", "snow", "contrast"],
                multiselect=True,
                label="Stored in the bank (slot 0 is always clean: the source code)",
                scale=3,
            )
            w["incoming"] = gr.Dropdown(list(CORRUPTIONS), value="snow", label="A new batch of")
        w["domains_text"] = gr.Markdown(elem_id="teach-domains-text")
        with gr.Row():
            w["kl_plot"] = gr.Plot(label="KL between domains")
            w["map_plot"] = gr.Plot(label="Domain map")
        w["retrieval_plot"] = gr.Plot(label="Retrieval")


def teach_tab(demo: gr.Blocks) -> Widgets:
    """The Teach tab, laid out inside ``demo`` (call it within its ``with gr.Blocks()``) and wired by name;
    returns its widgets by name."""
    ranks, collapse_layers = builtin_layers()
    widgets: Widgets = {}
    with gr.Tab("Teach: why IMSE works"):
        _controls(widgets)
        _experts_tab(widgets, ranks)
        _collapse_tab(widgets, collapse_layers)
        _step_tab(widgets)
        _domains_tab(widgets)
        _wire(demo, widgets)
    return widgets


def warm_up(widgets: Widgets) -> None:
    """The first views a page loads, computed once with the widgets' opening values when the server starts (not
    at import: ``python app.py`` runs it before it serves), so that the first visitor's Teach tab answers at once:
    the backbone's SVD, the accuracy-keeping-k curve and the domain map are then cached (about 3 s on 2 cores)."""
    for view in (teach.experts_view, teach.domains_view):
        view(**{name: widgets[name].value for name in inspect.signature(view).parameters})
