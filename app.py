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

from imse.app import errors, serving, ui, viz, your_images  # noqa: E402
from imse.app.lab_stream import panel_rows  # noqa: E402
from imse.app.teach_data import MAX_UPLOAD_BYTES  # noqa: E402
from imse.app.teach_tab import teach_tab, warm_up  # noqa: E402
from imse.app.theme import PAGE_CSS  # noqa: E402
from imse.data.upload_files import UploadLimits  # noqa: E402

START = ui.opening_values()  # the built-in model's default run, until a page loads (ui.open_page)


def setting(name, **overrides):
    """A settings widget's label, value, limits and choices, as LabConfig declares them (imse.runs.lab_config)."""
    return ui.setting_props(name, START[name], **overrides)


# Gradio's cache (uploads, downloads) is swept hourly of files older than an hour: a public Space's disk stays bounded
with gr.Blocks(title="IMSE Lab", delete_cache=(3600, 3600)) as demo:
    gr.Markdown(
        "# IMSE Lab\nTest-time adaptation of a Vision Transformer by its **spectral experts** (IMSE, ICLR 2026): "
        "corrupted images stream through the model, which adapts only its singular values, live."
    )
    backbone_note = gr.Markdown("", elem_id="backbone-note")  # says which backbone the Lab opens on, and why
    with gr.Tab("Lab"):
        with gr.Row():
            gr.Markdown("**Stories** — one click loads a run, says what to watch, and starts it:")
            preset_buttons = {
                key: gr.Button(f"▶ {preset.title}", size="sm") for key, preset in ui.PRESETS.items() if key != "default"
            }
        preset_text = gr.Markdown("")
        widgets = {}  # the run's settings by name: labels, limits and choices declared on LabConfig
        # which images stream: the backbone's own, or the visitor's (said back before anything runs), above the run
        images = gr.Radio([("the backbone's own", "own"), ("yours (upload a .zip or images)", "upload")], value="own",
                          label="Images", elem_id="images-choice")  # fmt: skip
        with gr.Column(visible=False) as upload_box:
            with gr.Row(equal_height=False):
                widgets["upload"] = gr.File(
                    label="A .zip (images · CLASS/images · DOMAIN/images · DOMAIN/CLASS/images) or image files",
                    file_count="multiple",
                    file_types=[".zip", "image"],
                    elem_id="your-images",
                    scale=2,
                    height=150,
                )
                with gr.Column(scale=1, min_width=240):
                    widgets["upload_streams"] = gr.Radio(**setting("upload_streams", choices=[
                        ("as they are: your domains are the shifts", "as-is"),
                        ("through the chosen corruptions: each one a domain", "corrupted")]))  # fmt: skip
                    widgets["upload_labels"] = gr.Radio(**setting("upload_labels", choices=[
                        ("from the class folders", "folders"), ("none: run unlabelled", "none")]))  # fmt: skip
            upload_found = gr.Markdown("Choose a .zip or image files.", elem_id="upload-found")
            upload_preview = gr.Gallery(label="A few of your images, as the model will see them", columns=8, rows=1,
                                        height=170, object_fit="contain", elem_id="upload-preview",
                                        allow_preview=False)  # fmt: skip
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop")
                status = gr.Markdown("Ready: press **Start** for the default run, or pick a story above.")
                widgets["backbone"] = gr.Dropdown(**setting("backbone", choices=ui.backbone_choices()),
                                                  allow_custom_value=True)  # fmt: skip
                widgets["scenario"] = gr.Radio(**setting("scenario"))
                widgets["corruptions"] = gr.Dropdown(**setting("corruptions"), multiselect=True)
                widgets["severity"] = gr.Slider(**setting("severity"), step=1)
                widgets["methods"] = gr.CheckboxGroup(**setting("methods"))
                with gr.Row():
                    for name in ("batch_size", "per_domain", "seed"):
                        widgets[name] = gr.Number(**setting(name))
                with gr.Row():
                    for name in ("imse_lr", "lambda_dm", "tau", "rounds"):
                        widgets[name] = gr.Number(**setting(name))
                with gr.Row():
                    widgets["device"] = gr.Dropdown(**setting("device"))
                    widgets["precision"] = gr.Dropdown(**setting("precision", choices=ui.precision_choices()))
            with gr.Column(scale=3):
                plots = {}  # the Lab's panels, one entry each in lab_stream.PANELS, laid out by their rows
                for row in panel_rows():
                    with gr.Row() if len(row) > 1 else contextlib.nullcontext():
                        for panel in row:
                            plots[panel.name] = gr.Plot(viz.empty_figure(panel.empty_title), label=panel.label)
                    if any(panel.name == "alignment" for panel in row):  # the switch under the heatmap it changes
                        widgets["show_source"] = gr.Checkbox(
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
        # wired by name: /start takes its inputs as keyword arguments (ui.START_INPUTS, the API's names and order)
        settings = [widgets[name] for name in ui.SETTINGS]
        inputs = {name: widgets[name] for name in ui.START_INPUTS}
        shown = dict(status=status, **plots, results=results, download=download)
        outputs = [shown[name] for name in ui.START_OUTPUTS]
        # every run enters at once and waits in the server's own queue, which tells it its place and wait (ui)
        a_run = dict(inputs_kwargs=inputs, concurrency_id="runs", concurrency_limit=ui.runs_at_once())
        run_events = [start.click(ui.start_lab, None, outputs, api_name="start", **a_run)]
        for key, button in preset_buttons.items():
            loaded = button.click(
                functools.partial(ui.load_preset, key), widgets["backbone"], [*settings, preset_text], api_name=False
            )
            run_events.append(loaded.then(ui.start_lab, None, outputs, api_name=False, **a_run))
        stop.click(ui.stop_lab, None, status, cancels=run_events, api_name="stop")
        images.change(your_images.choose_images, images, [upload_box, widgets["upload"]], api_name=False)
        checked = [widgets["upload"], widgets["backbone"], widgets["upload_labels"]]
        for changed in checked:  # said back before anything runs: what was found, a few images as the model sees them
            changed.change(your_images.check_upload, checked, [upload_found, upload_preview], api_name=False)
        imse_rates = [widgets["imse_lr"], widgets["lambda_dm"]]
        widgets["backbone"].input(ui.backbone_defaults, widgets["backbone"], imse_rates, api_name=False)
        gr.api(ui.load_preset, api_name="preset")  # a preset's settings by name (readable error for a bad name)
        demo.load(ui.open_page, None, [*settings, backbone_note], api_name=False)  # probes the hub once, then cached

    teach_widgets = teach_tab(demo)  # the Teach tab: its layout and its views, wired by name (imse.app.teach_tab)

    demo.unload(ui.end_session)  # a closed tab stops its session's run

errors.readable_events(demo)  # any event's unexpected error reaches the page as a sentence; the server logs it

# Runs: at most IMSE_MAX_CONCURRENT_RUNS compute at once and IMSE_MAX_QUEUE wait in the server's run queue, which
# tells each its place and wait (imse.app.run_queue); the next is refused ("queue is full"). Other event kinds: groups
# of IMSE_MAX_CONCURRENT_RUNS, at most IMSE_MAX_QUEUE waiting in Gradio's queue.
demo.queue(
    max_size=serving.limit("IMSE_MAX_QUEUE"), default_concurrency_limit=serving.limit("IMSE_MAX_CONCURRENT_RUNS")
)
serving.quiet_queue(demo._queue)  # an idle server polls every 50 ms, not every millisecond

if __name__ == "__main__":
    ui.start_run_workers()  # CPU runs compute in warm worker processes, not in the server's threads
    # the Teach tab's first views, once, before serving: here, not at import, and not in a thread (ZeroGPU forks
    # this process for a GPU call: a thread mid-computation would leave its locks held in the fork)
    warm_up(teach_widgets)
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
        # refused by the server before an upload reaches any code of ours: the larger of the Teach tab's image and the
        # Lab's upload limits (each checks its own again)
        max_file_size=max(MAX_UPLOAD_BYTES, UploadLimits.from_environment().max_bytes),
    )
