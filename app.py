"""IMSE Lab — the Gradio app: layout and event wiring only (logic lives in imse/).

Run: python app.py (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, default 127.0.0.1:7860). Works as a Hugging Face
Space: CPU by default, CUDA whenever present, and ZeroGPU through @spaces.GPU when the `spaces` package exists.
"""

import functools
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no outbound calls from the server

import gradio as gr  # noqa: E402

from imse.app import serving, ui  # noqa: E402
from imse.app.teach import MAX_UPLOAD_BYTES  # noqa: E402
from imse.data.corruptions import ALL_CORRUPTIONS  # noqa: E402
from imse.runs.lab import MAX_BATCH  # noqa: E402

try:  # ZeroGPU Spaces: borrow a GPU for each run
    import spaces

    start_lab = spaces.GPU(duration=300)(ui.start_lab)
except ImportError:
    start_lab = ui.start_lab

FORMULAS = r"""
**A spectral expert.** Every linear layer is split by SVD:
$W = U\,\mathrm{diag}(\sigma)\,V^\top = \sum_i \sigma_i u_i v_i^\top$.
Expert $i$ writes along $u_i$, scaled by $\sigma_i$, as much as the input points along $v_i$.
The $u_i$ are orthonormal, so two experts' outputs are orthogonal for any input (the check on the right).
IMSE adapts only the $\sigma_i$.

**Alignment.** For input rows $x_n$ (all tokens of all images): $a_{n,i} = v_i^\top x_n / \lVert x_n \rVert_2$,
and $\mathrm{Std}_i$ is its spread over the batch. Experts whose alignment no longer varies have stopped
telling images apart.

**Diversity loss.** $L_\ell$ = mean of $\mathrm{Std}_i$ over a layer's experts but the largest;
$L_{dm} = \frac{1}{3}\sum_{\ell \in \text{last 3 blocks}} L_\ell$. IMSE minimises reliable-sample entropy
$-\,\lambda_{dm} L_{dm}$ (λ = 50).

**Domain shift.** Patch-token mean/variance per channel give a descriptor; a batch starts a new domain when
$D = \mathrm{mean}_c\big[\tfrac{v_d + (\mu_d-\mu_b)^2}{2 v_b} + \tfrac{v_b + (\mu_d-\mu_b)^2}{2 v_d} - 1\big] > \tau$.
"""

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
                device = gr.Dropdown(ui.device_choices(), value=ui.device_choices()[-1], label="Device")
            with gr.Column(scale=3):
                empty = ui.empty_panels()
                accuracy_plot = gr.Plot(empty[0], label="Accuracy")
                collapse_plot = gr.Plot(empty[1], label="Collapse")
                with gr.Row():
                    alignment_plot = gr.Plot(empty[2], label="Expert alignment std")
                    shift_plot = gr.Plot(empty[3], label="Singular-value shifts")
                show_source = gr.Checkbox(False, label="Show the no-adaptation model's alignment heatmap instead")
                with gr.Row():
                    bank_plot = gr.Plot(empty[4], label="Domain bank")
                    batch_plot = gr.Plot(empty[5], label="Current batch")
                results = gr.Dataframe(label="Results (%, mean over the run)", interactive=False, visible=False)
                download = gr.File(label="Download the run (records JSON, spectral code, bank)", visible=False)
        # wired by name, in the orders ui.start_lab and its API callers use (ui.START_INPUTS / START_OUTPUTS)
        widgets = dict(backbone=backbone, scenario=scenario, corruptions=corruptions, severity=severity)
        widgets.update(methods=methods, batch_size=batch_size, per_domain=per_domain, seed=seed, imse_lr=imse_lr)
        widgets.update(lambda_dm=lambda_dm, tau=tau, rounds=rounds, device=device, show_source=show_source)
        settings = [widgets[name] for name in ui.SETTINGS]
        inputs = [widgets[name] for name in ui.START_INPUTS]
        shown = dict(status=status, accuracy=accuracy_plot, collapse=collapse_plot, alignment=alignment_plot)
        shown.update(shifts=shift_plot, bank=bank_plot, batch=batch_plot, results=results, download=download)
        outputs = [shown[name] for name in ui.START_OUTPUTS]
        run_events = [start.click(start_lab, inputs, outputs, api_name="start", concurrency_id="runs")]
        for key, button in preset_buttons.items():
            loaded = button.click(
                functools.partial(ui.load_preset, key), backbone, [*settings, preset_text], api_name=False
            )
            run_events.append(loaded.then(start_lab, inputs, outputs, api_name=False, concurrency_id="runs"))
        stop.click(ui.stop_lab, None, status, cancels=run_events, api_name="stop")
        backbone.input(ui.backbone_defaults, backbone, [imse_lr, lambda_dm], api_name=False)
        gr.api(ui.load_preset, api_name="preset")  # a preset's settings by name (readable error for a bad name)

    with gr.Tab("Teach: what is a spectral expert?"):
        layers = ui.teach_layers()
        samples = [label for _, label in ui.teach.sample_images()]
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                teach_backbone = gr.Dropdown(ui.backbone_choices(), value="builtin", label="Backbone")
                layer = gr.Dropdown(layers, value=layers[0], label="Layer")
                sample = gr.Radio(samples, value=samples[0], label="Sample image")
                upload = gr.Image(type="filepath", label="…or upload one (PNG/JPEG/WebP, ≤ 10 MB)", height=160)
                expert = gr.Slider(0, 127, value=0, step=1, label="Expert i")
                scale = gr.Slider(0.0, 3.0, value=1.0, step=0.05, label="Scale σ_i by")
                preview = gr.Image(label="The image the model sees", height=120, interactive=False)
                gr.Markdown(FORMULAS, latex_delimiters=[{"left": "$", "right": "$", "display": False}])
            with gr.Column(scale=2):
                prediction = gr.Markdown()
                with gr.Row():
                    spectrum_plot = gr.Plot(label="Singular spectrum")
                    orthogonality_plot = gr.Plot(label="Expert outputs are orthogonal")
                with gr.Row():
                    top5_base = gr.Plot(label="Top-5")
                    top5_scaled = gr.Plot(label="Top-5, scaled expert")
        teach_backbone.change(ui.teach_backbone, teach_backbone, [layer, expert], api_name=False)
        layer_inputs = [teach_backbone, layer, sample, upload, expert]
        predict_inputs = [*layer_inputs, scale]
        predict_outputs = [prediction, top5_base, top5_scaled, preview]
        for trigger in (layer.change, sample.change, upload.change, expert.release):
            trigger(ui.teach_layer, layer_inputs, [spectrum_plot, orthogonality_plot], api_name=False)
        for trigger in (layer.change, sample.change, upload.change, expert.release, scale.release):
            trigger(ui.teach_predict, predict_inputs, predict_outputs, api_name=False)
        demo.load(ui.teach_layer, layer_inputs, [spectrum_plot, orthogonality_plot], api_name=False)
        demo.load(ui.teach_predict, predict_inputs, predict_outputs, api_name=False)

    demo.unload(ui.end_session)  # a closed tab stops its session's run

# At most IMSE_MAX_CONCURRENT_RUNS runs compute at once (each event kind its own group of that size); at most
# IMSE_MAX_QUEUE requests wait in the queue, the next is refused ("queue is full").
demo.queue(
    max_size=serving.limit("IMSE_MAX_QUEUE"), default_concurrency_limit=serving.limit("IMSE_MAX_CONCURRENT_RUNS")
)

if __name__ == "__main__":
    # System fonts only: the default theme would fetch Google Fonts, and the page must make no outside request.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        theme=theme,
        show_error=False,
        max_file_size=MAX_UPLOAD_BYTES,  # refused by the server before the upload reaches any code of ours
    )
