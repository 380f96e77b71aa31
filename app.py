"""IMSE Lab — the Gradio app: layout and event wiring only (logic lives in imse/).

Run: python app.py (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, default 127.0.0.1:7860). Works as a Hugging Face
Space: CPU by default, CUDA whenever present, and ZeroGPU (a cuda run is one @spaces.GPU call: imse.app.zerogpu).
"""

import contextlib
import functools
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outbound calls from the server

with contextlib.suppress(ImportError):  # on ZeroGPU `spaces` goes first: it patches torch before others import it
    import spaces  # noqa: F401

import gradio as gr  # noqa: E402

from imse.app import serving, teach, teach_data, ui, viz  # noqa: E402
from imse.app.lab_stream import panel_rows  # noqa: E402
from imse.app.teach_data import MAX_UPLOAD_BYTES  # noqa: E402
from imse.app.theme import PAGE_CSS  # noqa: E402
from imse.data.corruptions import ALL_CORRUPTIONS, CORRUPTIONS  # noqa: E402
from imse.runs.lab import MAX_BATCH  # noqa: E402

start_lab = ui.start_lab  # on a ZeroGPU Space, a cuda run is one GPU call sized to the run (imse.app.zerogpu)
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

DEFAULT_BACKBONE, BACKBONE_NOTE = ui.startup_backbone()  # probes the hub ≤ 3 s (not at all offline)
START = dict(zip(ui.SETTINGS, ui.settings_values("default", DEFAULT_BACKBONE)))

# Gradio's cache (uploads, downloads) is swept hourly of files older than an hour: a public Space's disk stays bounded
with gr.Blocks(title="IMSE Lab", delete_cache=(3600, 3600)) as demo:
    gr.Markdown(
        "# IMSE Lab\nTest-time adaptation of a Vision Transformer by its **spectral experts** (IMSE, ICLR 2026): "
        "corrupted images stream through the model, which adapts only its singular values, live."
    )
    gr.Markdown(BACKBONE_NOTE, elem_id="backbone-note")
    with gr.Tab("Lab"):
        with gr.Row():
            gr.Markdown("**Stories** — one click loads a run, says what to watch, and starts it:")
            preset_buttons = {
                key: gr.Button(f"▶ {preset.title}", size="sm") for key, preset in ui.PRESETS.items() if key != "default"
            }
        preset_text = gr.Markdown("")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop")
                status = gr.Markdown("Ready: press **Start** for the default run, or pick a story above.")
                backbone = gr.Dropdown(ui.backbone_choices(), value=START["backbone"], label="Backbone")
                scenario = gr.Radio(
                    ["single", "continual", "gradual", "recurring"], value=START["scenario"], label="Scenario"
                )
                corruptions = gr.Dropdown(
                    list(ALL_CORRUPTIONS), value=START["corruptions"], multiselect=True, label="Corruptions (in order)"
                )
                severity = gr.Slider(1, 5, value=START["severity"], step=1, label="Severity")
                methods = gr.CheckboxGroup(
                    ui.method_labels(), value=START["methods"], label="Methods (several = compare on the same batches)"
                )
                with gr.Row():
                    batch_size = gr.Number(
                        START["batch_size"], precision=0, minimum=1, maximum=MAX_BATCH, label="Batch size"
                    )
                    per_domain = gr.Number(START["per_domain"], precision=0, minimum=1, label="Images per domain")
                    seed = gr.Number(START["seed"], precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
                with gr.Row():
                    imse_lr = gr.Number(START["imse_lr"], label="IMSE lr")
                    lambda_dm = gr.Number(START["lambda_dm"], label="λ_dm")
                    tau = gr.Number(START["tau"], label="τ (shift)")
                    rounds = gr.Number(START["rounds"], precision=0, minimum=1, maximum=10, label="Rounds (recurring)")
                with gr.Row():
                    device = gr.Dropdown(ui.device_choices(), value=ui.device_choices()[-1], label="Device")
                    precision = gr.Dropdown(ui.precision_choices(), value="fp32", label="Precision")
            with gr.Column(scale=3):
                plots = {}  # the Lab's panels, one entry each in lab_stream.PANELS, laid out by their rows
                for row in panel_rows():
                    with gr.Row() if len(row) > 1 else contextlib.nullcontext():
                        for panel in row:
                            plots[panel.name] = gr.Plot(viz.empty_figure(panel.title), label=panel.label)
                    if any(panel.name == "alignment" for panel in row):  # the switch under the heatmap it changes
                        show_source = gr.Checkbox(
                            False, label="Show the no-adaptation model's alignment heatmap instead"
                        )
                results = gr.Dataframe(  # headers wrap and the method stays pinned: every column fits the page
                    label="Results (%, mean over the run)",
                    interactive=False,
                    visible=False,
                    wrap=True,
                    pinned_columns=1,
                )
                download = gr.File(label="Download the run (records JSON, spectral code, bank)", visible=False)
        # wired by name, in the orders ui.start_lab and its API callers use (ui.START_INPUTS / START_OUTPUTS)
        widgets = dict(backbone=backbone, scenario=scenario, corruptions=corruptions, severity=severity)
        widgets.update(methods=methods, batch_size=batch_size, per_domain=per_domain, seed=seed, imse_lr=imse_lr)
        widgets.update(lambda_dm=lambda_dm, tau=tau, rounds=rounds, device=device, show_source=show_source)
        widgets.update(precision=precision)
        settings = [widgets[name] for name in ui.SETTINGS]
        inputs = [widgets[name] for name in ui.START_INPUTS]
        shown = dict(status=status, **plots, results=results, download=download)
        outputs = [shown[name] for name in ui.START_OUTPUTS]
        # every run enters at once and waits in the server's own queue, which tells it its place and wait (ui)
        at_once = dict(concurrency_id="runs", concurrency_limit=ui.runs_at_once())
        run_events = [start.click(start_lab, inputs, outputs, api_name="start", **at_once)]
        for key, button in preset_buttons.items():
            loaded = button.click(
                functools.partial(ui.load_preset, key), backbone, [*settings, preset_text], api_name=False
            )
            run_events.append(loaded.then(start_lab, inputs, outputs, api_name=False, **at_once))
        stop.click(ui.stop_lab, None, status, cancels=run_events, api_name="stop")
        backbone.input(ui.backbone_defaults, backbone, [imse_lr, lambda_dm], api_name=False)
        gr.api(ui.load_preset, api_name="preset")  # a preset's settings by name (readable error for a bad name)

    with gr.Tab("Teach: why IMSE works"):
        ranks = teach.layer_ranks()
        layers = list(ranks)
        samples = [label for _, label in teach_data.sample_images()]
        collapse_layers = teach.diversity_layers()
        with gr.Row():
            teach_backbone = gr.Dropdown(ui.backbone_choices(), value="builtin", label="Backbone", scale=2)
            corruption = gr.Dropdown(list(CORRUPTIONS), value="contrast", label="Corruption (views 2–4)")
            severity = gr.Slider(1, 5, value=3, step=1, label="Severity (views 2–4)")
        with gr.Tab("1 · Spectral experts"):
            gr.Markdown(TEACH_TEXT["experts"], latex_delimiters=LATEX)
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    layer = gr.Dropdown(layers, value=layers[0], label="Layer")
                    scope = gr.Radio(list(teach.SCOPES), value=teach.SCOPES[0], label="Keep the k largest experts in")
                    rank_k = gr.Slider(1, max(ranks.values()), value=ranks[layers[0]], step=1, label="k")
                    expert = gr.Slider(0, ranks[layers[0]] - 1, value=0, step=1, label="Expert i")
                    scale = gr.Slider(0.0, teach.MAX_SCALE, value=1.0, step=0.05, label="Scale σ_i by")
                    sample = gr.Radio(samples, value=samples[0], label="Sample image")
                    upload = gr.Image(type="filepath", label="…or upload one (PNG/JPEG/WebP, ≤ 10 MB)", height=140)
                    preview = gr.Image(label="The image the model sees", height=110, interactive=False)
                with gr.Column(scale=3):
                    experts_text = gr.Markdown(elem_id="teach-experts-text")
                    with gr.Row():
                        spectrum_plot = gr.Plot(label="Spectrum")
                        rank_plot = gr.Plot(label="Accuracy keeping k experts")
                    with gr.Row():
                        top5_base = gr.Plot(label="Top-5, all experts")
                        top5_edited = gr.Plot(label="Top-5, edited")
        with gr.Tab("2 · Collapse, measured"):
            gr.Markdown(TEACH_TEXT["collapse"], latex_delimiters=LATEX)
            with gr.Row():
                collapse_layer = gr.Dropdown(collapse_layers, value=collapse_layers[-1], label="Layer", scale=2)
                measure = gr.Button("Measure", variant="primary")
            collapse_state = gr.State()
            collapse_text = gr.Markdown(elem_id="teach-collapse-text")
            with gr.Row():
                collapse_experts_plot = gr.Plot(label="Per expert")
                collapse_layers_plot = gr.Plot(label="Per layer")
            with gr.Row():
                collapse_history_plot = gr.Plot(label="While adapting")
                predictions_plot = gr.Plot(label="Predicted classes")
        with gr.Tab("3 · One IMSE step"):
            gr.Markdown(TEACH_TEXT["step"], latex_delimiters=LATEX)
            explorer = gr.State()
            with gr.Row():
                step_button = gr.Button("Step", variant="primary")
                reset_button = gr.Button("Reset")
            step_text = gr.Markdown(elem_id="teach-step-text")
            with gr.Row():
                entropy_plot = gr.Plot(label="Entropy filter")
                loss_plot = gr.Plot(label="Objective")
            with gr.Row():
                moved_table = gr.Dataframe(
                    headers=["layer", "expert", "Δσ", "σ before"], label="Experts whose σ moved most", interactive=False
                )
                step_predictions_plot = gr.Plot(label="Predictions")
        with gr.Tab("4 · Domains and retrieval"):
            gr.Markdown(TEACH_TEXT["domains"], latex_delimiters=LATEX)
            with gr.Row():
                stored = gr.Dropdown(
                    list(CORRUPTIONS),
                    value=["gaussian_noise", "defocus_blur", "snow", "contrast"],
                    multiselect=True,
                    label="Stored in the bank (slot 0 is always clean: the source code)",
                    scale=3,
                )
                incoming = gr.Dropdown(list(CORRUPTIONS), value="snow", label="A new batch of")
            domains_text = gr.Markdown(elem_id="teach-domains-text")
            with gr.Row():
                kl_plot = gr.Plot(label="KL between domains")
                map_plot = gr.Plot(label="Domain map")
            retrieval_plot = gr.Plot(label="Retrieval")

        teach_backbone.change(
            teach.on_backbone, teach_backbone, [layer, rank_k, expert, sample, collapse_layer], api_name=False
        )
        experts_inputs = [teach_backbone, layer, scope, rank_k, expert, scale, sample, upload]
        experts_outputs = [experts_text, spectrum_plot, rank_plot, top5_base, top5_edited, preview]
        for trigger in (layer.change, scope.change, sample.change, upload.change, rank_k.change, expert.change,
                        scale.change, teach_backbone.change):  # fmt: skip
            trigger(teach.experts_view, experts_inputs, experts_outputs, api_name=False, trigger_mode="always_last")
        collapse_outputs = [collapse_state, collapse_text, collapse_experts_plot, collapse_layers_plot,
                            collapse_history_plot, predictions_plot]  # fmt: skip
        measure.click(
            teach.collapse_view,
            [teach_backbone, corruption, severity, collapse_layer],
            collapse_outputs,
            api_name=False,
        )
        collapse_layer.change(
            teach.collapse_layer, [collapse_state, teach_backbone, collapse_layer], collapse_outputs, api_name=False
        )
        step_inputs = [explorer, teach_backbone, corruption, severity]
        step_outputs = [explorer, step_text, entropy_plot, loss_plot, moved_table, step_predictions_plot]
        step_button.click(teach.step_view, step_inputs, step_outputs, api_name=False)
        reset_button.click(teach.step_reset, step_inputs, step_outputs, api_name=False)
        domains_inputs = [teach_backbone, severity, stored, incoming]
        domains_outputs = [domains_text, kl_plot, map_plot, retrieval_plot]
        for trigger in (stored.change, incoming.change, severity.release, teach_backbone.change):
            trigger(teach.domains_view, domains_inputs, domains_outputs, api_name=False)
        demo.load(teach.experts_view, experts_inputs, experts_outputs, api_name=False)
        demo.load(teach.domains_view, domains_inputs, domains_outputs, api_name=False)

    demo.unload(ui.end_session)  # a closed tab stops its session's run

# Runs: at most IMSE_MAX_CONCURRENT_RUNS compute at once and IMSE_MAX_QUEUE wait in the server's run queue, which
# tells each its place and wait (imse.app.run_queue); the next is refused ("queue is full"). Other event kinds: groups
# of IMSE_MAX_CONCURRENT_RUNS, at most IMSE_MAX_QUEUE waiting in Gradio's queue.
demo.queue(
    max_size=serving.limit("IMSE_MAX_QUEUE"), default_concurrency_limit=serving.limit("IMSE_MAX_CONCURRENT_RUNS")
)
serving.quiet_queue(demo._queue)  # an idle server polls every 50 ms, not every millisecond

if __name__ == "__main__":
    ui.start_run_workers()  # CPU runs compute in warm worker processes, not in the server's threads
    # System fonts only: the default theme would fetch Google Fonts, and the page must make no outside request.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        theme=theme,
        css=PAGE_CSS,  # the figures follow the visitor's light or dark theme (imse.app.theme)
        show_error=False,
        max_file_size=MAX_UPLOAD_BYTES,  # refused by the server before the upload reaches any code of ours
    )
