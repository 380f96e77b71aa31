"""Glue between Gradio events and the library: turn widget values into calls, results into panel values.

Every failure a user can cause becomes a ``gr.Error`` with a readable message (never a traceback in the page);
the logic stays in ``imse.runs.lab`` and ``imse.app.viz`` (the Teach tab has its own glue, ``imse.app.teach``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import gradio as gr

from imse.app import run_cost, serving, your_images, zerogpu
from imse.app.lab_stream import OUTPUTS, lab_updates
from imse.app.run_queue import QueueFull, RunQueue
from imse.app.run_workers import RunWorkers
from imse.core.resources import offline
from imse.data.backbones import BUILTIN, HUB, backbone_card, backbone_data, lab_backbones
from imse.data.corruptions import corruption_names
from imse.data.models import hub_reachable
from imse.runs.defaults import PRESETS, default_backbone, lab_settings, method_choices
from imse.runs.lab import LabConfig, validate
from imse.runs.lab_config import Setting, lab_settings_declared

__all__ = [
    "backbone_choices",
    "end_session",
    "load_preset",
    "start_lab",
    "startup_backbone",
    "stop_lab",
]

_DECLARED = lab_settings_declared()  # every run setting, declared once on LabConfig
# the widgets a story preset fills (load_preset's outputs, in this order)
SETTINGS = tuple(name for name, setting in _DECLARED.items() if setting.preset)
# what /start takes and gives, by name (app.py wires its widgets by these names; clients may call it by name or by
# position): every setting, and show_source. An input added later goes last, with a default, so that a client that
# sends the older arguments by position still calls /start as before: precision came after show_source.
# precision came after show_source, then a visitor's own images: the upload (none: the backbone's own data), how it
# streams and its labels.
_ADDED_LATER = ("precision", "upload", "upload_streams", "upload_labels")
START_INPUTS = (*(name for name in _DECLARED if name not in _ADDED_LATER), "show_source", *_ADDED_LATER)
START_OUTPUTS = OUTPUTS
RUNS = serving.SessionRuns()


def backbone_choices() -> list[tuple[str, str]]:
    """The Lab's backbones (their cards' labels, in the cards' order), a hub model's with a note: it downloads its
    weights when chosen, and on a machine without a GPU it adapts slowly."""
    note = " — offline: needs its weights in the local cache" if offline() else " — downloads weights when started"
    if not serving.gpu_present():
        note += "; slow without a GPU (ViT-B/16: ~1 image/s)"
    cards = [backbone_card(name) for name in lab_backbones()]
    return [(card.label + (note if card.weights == HUB else ""), card.name) for card in cards]


def startup_backbone(timeout: float = 3.0) -> tuple[str, str]:
    """The backbone the Lab opens with, and the note shown under the title (``imse.runs.defaults.default_backbone``):
    the hub is probed for at most ``timeout`` s, and not at all offline."""
    reachable = hub_reachable(timeout)  # False at once under HF_HUB_OFFLINE
    return default_backbone(reachable, serving.gpu_present())


@functools.cache
def _opening_backbone() -> tuple[str, str]:
    return startup_backbone()


def open_page() -> tuple:
    """A page loads: the settings widgets (``SETTINGS``) at the default run of the backbone the Lab opens with, and
    the note that says why. The hub is probed once per server, when the first page loads — not at import, so the
    server is up at once; until it answers the page shows the built-in model's default run, which it keeps (the
    widgets untouched: a story clicked meanwhile stays loaded) unless the Lab opens on another backbone."""
    backbone, note = _opening_backbone()
    if backbone == BUILTIN:
        return (*[gr.skip()] * len(SETTINGS), note)
    return (*settings_values("default", backbone), note)


def settings_values(preset: str = "default", backbone: str = BUILTIN) -> list:
    """The widget values of a preset (``SETTINGS`` order) for ``backbone``."""
    settings = lab_settings(preset, backbone)
    return [list(settings[name]) if isinstance(settings[name], tuple) else settings[name] for name in SETTINGS]


def opening_values() -> dict[str, Any]:
    """Every settings widget's value when the page opens: the built-in model's default run, on the GPU when one
    is here, at the default precision."""
    values = dict(zip(SETTINGS, settings_values("default"), strict=True))
    others = {name: getattr(LabConfig, name) for name in _DECLARED if name not in SETTINGS}  # a preset's not
    return {**values, **others, "device": device_choices()[-1]}


def load_preset(name: Any, backbone: Any = BUILTIN) -> tuple:
    """A story preset's settings for the widgets, and its 'what to watch' text (a readable error for a name
    that is not a preset)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise gr.Error(f"unknown preset {str(name)[:40]!r}; choose one of: {', '.join(PRESETS)}")
    backbone = check_backbone(backbone, typed=True)
    preset = PRESETS[name]
    return (*settings_values(name, backbone), f"**{preset.title}.** {preset.watch}")


def backbone_defaults(backbone: Any) -> tuple:
    """A newly chosen backbone's tuned IMSE lr and λ_dm for the number fields."""
    settings = lab_settings("default", check_backbone(backbone, typed=True))
    return settings["imse_lr"], settings["lambda_dm"]


def device_choices() -> list[str]:
    """The devices a run may use here, as LabConfig declares them (cuda only where a GPU is)."""
    return list(_DECLARED["device"].choices())


def precision_choices() -> list[tuple[str, str]]:
    """The Precision dropdown's (label, value) pairs; fp32 first, the default."""
    return [("fp32", "fp32"), ("tf32 (CUDA matmuls; on the CPU as fp32)", "tf32"),
            ("bf16 (autocast forwards)", "bf16")]  # fmt: skip


def as_int(value: Any, name: str) -> int:
    """A widget's whole number (the Lab's and the Teach tab's), or a readable gr.Error."""
    if isinstance(value, bool):  # float(True) is 1.0: a checkbox value is not a number
        raise gr.Error(f"{name} must be a whole number")
    if isinstance(value, int):  # exact, however large (float() would round 2**53 + 1)
        return value
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(f"{name} must be a whole number") from None
    if not math.isfinite(number) or number != int(number):
        raise gr.Error(f"{name} must be a whole number")
    return int(number)


def as_number(value: Any, name: str) -> float:
    """A number field's value as a float; NaN and ±inf pass through, for ``validate`` to refuse by name."""
    if isinstance(value, bool):
        raise gr.Error(f"{name} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # None, "abc", [1], an int beyond float's range
        raise gr.Error(f"{name} must be a number") from None


def _as_names(value: Any, name: str, groups: dict | None = None) -> tuple:
    """A multi-choice field: a list (or tuple) of names, or one name (or group name) as a string."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (groups or {}).get(value, (value,))
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise gr.Error(f"{name} must be a list of names, got {type(value).__name__}")


def check_backbone(backbone: Any, *, typed: bool = False) -> str:
    """One of the offered backbones; with ``typed`` (the Lab's box) also any timm ViT tag that passes
    ``imse.data.vit_tags`` (a name timm lists with weights, a ViT with a classifier, small enough). Free text never
    becomes a path, nor a model outside timm's list."""
    setting = _DECLARED["backbone"]
    if backbone in (None, ""):
        return BUILTIN
    offered = list(setting.choices())
    if isinstance(backbone, str) and backbone in offered:
        return backbone
    if typed and isinstance(backbone, str):
        problem = setting.other(backbone)
        if problem is None:
            return backbone
        raise gr.Error(problem)
    raise gr.Error(f"unknown backbone {str(backbone)[:80]!r}; choose one of: {', '.join(offered)}")


def make_config(data: str | None = None, **values: Any) -> LabConfig:
    """The Lab's settings as the widgets (or an API client) give them, by name (strings, floats, None), into a
    validated ``LabConfig``: each read by its declared kind; a setting left out, or a choice left empty, is the
    default run's. ``data``: the server's (a visitor's prepared upload), else the backbone's own. Anything wrong is
    a readable ``gr.Error``."""
    if unknown := sorted(set(values) - set(_DECLARED)):
        raise gr.Error(f"unknown setting(s) {', '.join(unknown)[:200]}; the settings are {', '.join(_DECLARED)}")
    read = {name: _read(_DECLARED[name], name, value) for name, value in values.items()}
    read = {name: value for name, value in read.items() if value is not None}
    backbone = read.get("backbone", LabConfig.backbone)
    if data is None:
        data = backbone_data(backbone) if isinstance(backbone, str) else LabConfig.data  # else validate names it
    try:
        return validate(LabConfig(**read, data=data))
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error)) from None


def _read(setting: Setting, name: str, value: Any) -> Any:
    """One widget value as its setting's kind (``None``: a choice left empty, the default's); ``validate`` then
    checks its range and choices."""
    if setting.kind == "whole":
        return as_int(value, setting.said)
    if setting.kind == "number":
        return as_number(value, setting.said)
    if setting.kind == "names":
        # an API client may name a group of corruptions: corruptions="test" (or "validation")
        groups = {split: corruption_names(split) for split in ("test", "validation")} if name == "corruptions" else {}
        return _as_names(value, f"{setting.said}s", groups)
    return None if value in (None, "") else value


def setting_props(name: str, value: Any, **overrides: Any) -> dict[str, Any]:
    """A settings widget's label, value, limits and choices as ``LabConfig`` declares them (``overrides``: what
    only the page says, e.g. choices with longer labels)."""
    setting = _DECLARED[name]
    props: dict[str, Any] = {"label": setting.label, "value": list(value) if isinstance(value, tuple) else value}
    if setting.kind == "whole":  # a real's lower limit may be open, which a widget cannot say: validate says it
        props.update(minimum=setting.low, maximum=setting.high, precision=0)
    if setting.choices is not None:
        props["choices"] = list(setting.choices())
    return {**props, **overrides}


def start_lab(
    request: gr.Request = None,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's way of asking for a progress bar)
    upload: Any = None,  # named, with its default: API clients may leave it out (the backbone's own data)
    **inputs: Any,
) -> Iterator[tuple]:
    """Stream a run: (status, every panel, results table, download) about once a second. A first download (hub
    weights, Imagenette) shows a progress bar. Gradio passes the inputs by name (``START_INPUTS``: every setting of
    ``LabConfig``, ``show_source`` and ``upload``); they go on to ``make_config`` as they are. One left out is the
    default run's (``precision``: fp32, for a client older than it). ``upload`` (a .zip or image files, as the page
    or ``gradio_client.handle_file`` sends them): the visitor's own images, prepared in the session's folder (or
    found there, checked on upload), instead of the backbone's own data.

    The run belongs to the visitor's session: Stop or closing the tab ends it at the next batch, wherever it
    computes (here, or in a ZeroGPU worker: a ``cuda`` run on a ZeroGPU Space is one GPU call,
    ``imse.app.zerogpu``), and the memory it held is handed back when it ends, however it ends.
    """
    show_source = bool(inputs.pop("show_source", False))
    session = _session(request)
    data = None
    if your_images.upload_paths(upload):  # prepared in the session's folder, or found there (checked on upload)
        backbone = check_backbone(inputs.get("backbone"), typed=True)
        data = your_images.prepared_data(upload, backbone, inputs.get("upload_labels") or "folders", session, progress)
    config = make_config(data, **inputs)
    stop = RUNS.start(session)

    def downloading(done: int, total: int | None, what: str) -> None:
        progress((done, total) if total else None, desc=what, unit="B")

    try:
        if serving.zero_gpu() and config.device == "cuda":  # computes in a GPU worker, queued by ZeroGPU
            yield from zerogpu.gpu_lab_updates(config, show_source, stop, serving.export_dir(), downloading)
        else:
            yield from _queued_updates(config, show_source, stop, downloading)
    finally:
        RUNS.finish(session, stop)


def runs_at_once() -> int:
    """How many Start events Gradio lets in at once: every computing run and every waiting place of the queue."""
    return serving.limit("IMSE_MAX_CONCURRENT_RUNS") + serving.limit("IMSE_MAX_QUEUE")


@functools.cache
def _run_queue() -> RunQueue:
    """The server's queue of runs computing here (made on first use, with the host's limits)."""
    slots, places = serving.limit("IMSE_MAX_CONCURRENT_RUNS"), serving.limit("IMSE_MAX_QUEUE")
    # work: a run's CPU-measured step seconds alone (the prior: 1 machine-second each; finished runs correct it)
    return RunQueue(slots, places, seconds_per_work=1.0)


def _queued_updates(config: LabConfig, show_source: bool, stop: serving.StopToken, downloading) -> Iterator[tuple]:
    """Wait for a slot, telling the visitor its place and the expected wait every second, then run."""
    queue = _run_queue()
    try:
        ticket = queue.join(run_cost.run_seconds(config, config.device))
    except QueueFull as full:
        raise gr.Error(str(full)) from None
    completed = False
    try:
        for place, seconds in queue.waiting(ticket):
            if stop.is_set():
                return
            unchanged = [gr.skip()] * (len(OUTPUTS) - 1)
            yield (f"**Waiting for a free slot**: {_ordinal(place)} in line, about {seconds:.0f} s", *unchanged)
        compute = _workers.updates if _workers is not None else lab_updates  # in a worker, when the server has them
        yield from compute(config, show_source, stop, serving.export_dir(), downloading)
        completed = not stop.is_set()
    finally:
        queue.leave(ticket, completed=completed)


_workers: RunWorkers | None = None  # made by start_run_workers


def start_run_workers() -> None:
    """Compute this server's CPU runs in warm worker processes (``imse.app.run_workers``), one per slot. Called
    by ``python app.py`` before it serves (they warm up meanwhile: a run asked for sooner waits for that);
    without it (the tests' direct calls) runs compute in the caller."""
    global _workers
    if _workers is None:
        _workers = RunWorkers(serving.limit("IMSE_MAX_CONCURRENT_RUNS"))


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _session(request: gr.Request | None) -> str:
    """The visitor's browser session (direct calls without Gradio share one, "local")."""
    return getattr(request, "session_hash", None) or "local"


def stop_lab(request: gr.Request = None) -> str:
    """The Stop button: end this session's run at its next batch (the panels keep what they show)."""
    RUNS.stop(_session(request))
    return "Stopped: the panels keep what was shown."


def end_session(request: gr.Request = None) -> None:
    """A closed tab: stop whatever that session still had running, and delete its uploads."""
    RUNS.stop(_session(request))
    serving.forget_uploads(_session(request))


def method_labels() -> list[str]:
    return list(method_choices())
