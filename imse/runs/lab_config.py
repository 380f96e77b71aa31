"""A Lab run's settings, declared once: ``LabConfig`` (the default run's values) and, on each field, a ``Setting``
(its label, how messages name it, its kind and limits); ``validate`` checks a config against them.

The UI lays its widgets out from these declarations (labels, limits, choices), the API takes the settings by
these names, ``make_config`` reads each by its kind, and ``validate`` checks each against its limits: a setting
changed here changes everywhere. Kept apart from the run itself (``imse.runs.lab``): the UI, the API and the
ZeroGPU sizing read the settings and their limits without the run's machinery.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imse.core.methods.base import COMMON_DEFAULTS, PRECISIONS
from imse.data.backbones import BUILTIN, IMAGENET_DATA, backbone_card, backbone_data, lab_backbones
from imse.data.builders import upload_folder
from imse.data.corruptions import corruption_names
from imse.data.streams import GRADUAL_SEVERITIES, SCENARIOS
from imse.data.uploads import AS_IS, UPLOAD_STREAMS, load_prepared
from imse.runs.defaults import lab_settings, method_choices

__all__ = ["MAX_BATCH", "MAX_IMAGES", "LabConfig", "Setting", "lab_settings_declared", "run_images", "validate"]

MAX_IMAGES = 200_000  # per run: keeps a public Space's runs bounded
MAX_BATCH = 256
MAX_SEED = 2**32 - 1  # the stream derives generator seeds from the seed: keep them in range
_DEFAULT = lab_settings()


@dataclass(frozen=True)
class Setting:
    """How one run setting is shown, read and checked. ``kind``: ``choice`` (one of ``choices()``), ``names`` (a
    non-empty list of ``choices()``), ``whole`` or ``number`` (within ``low``..``high``). ``choices`` is called
    when needed, so a method or backbone registered later is offered and accepted. ``preset``: a story preset
    sets it (the device and the precision are the visitor's machine's, not the story's)."""

    label: str  # the widget's label
    said: str  # how a message names it: "batch size must be 1 to 256"
    kind: str
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    choices: Callable[[], Sequence[str]] | None = None
    unique: bool = False  # names: each at most once
    preset: bool = True
    # a choice that also takes values beyond ``choices()`` (any timm ViT tag): what is wrong with one, or None
    other: Callable[[str], str | None] | None = None


def _setting(default: Any, label: str, said: str, kind: str, **limits: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(label, said, kind, **limits)})


def _other_backbone(name: str) -> str | None:
    """Why a backbone the menu does not list cannot run (``imse.data.vit_tags``: any timm ViT tag may)."""
    from imse.data.vit_tags import inspect_vit

    try:
        inspect_vit(name)
    except ValueError as error:
        return f"backbone: {error}"
    return None


LABELS = ("folders", "none")  # an upload's labels: from its class folders, or none (run unlabelled)


def _devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


@dataclass
class LabConfig:
    """One Lab run's settings, in the order ``/start`` takes them; the defaults are the default run's
    (``imse.runs.defaults.lab_settings``)."""

    backbone: str = _setting(
        _DEFAULT["backbone"], "Backbone (or type any timm ViT tag)", "backbone", "choice", choices=lab_backbones,
        other=_other_backbone,
    )  # fmt: skip
    scenario: str = _setting(_DEFAULT["scenario"], "Scenario", "scenario", "choice", choices=lambda: SCENARIOS)
    corruptions: tuple[str, ...] = _setting(
        _DEFAULT["corruptions"],
        "Corruptions (in order)",
        "corruption",
        "names",
        choices=lambda: corruption_names("all"),
    )
    severity: int = _setting(_DEFAULT["severity"], "Severity", "severity", "whole", low=1, high=5)
    methods: tuple[str, ...] = _setting(
        _DEFAULT["methods"], "Methods (several = compare on the same batches)", "method", "names",
        choices=lambda: tuple(method_choices()), unique=True,
    )  # fmt: skip
    batch_size: int = _setting(_DEFAULT["batch_size"], "Batch size", "batch size", "whole", low=1, high=MAX_BATCH)
    per_domain: int = _setting(
        _DEFAULT["per_domain"], "Images per domain", "images per domain", "whole", low=1, high=MAX_IMAGES
    )
    seed: int = _setting(_DEFAULT["seed"], "Seed", "seed", "whole", low=0, high=MAX_SEED)
    # IMSE's lr and λ_dm: the validation sweep's choice for the backbone
    imse_lr: float = _setting(_DEFAULT["imse_lr"], "IMSE lr", "IMSE lr", "number", low=0, high=1, open_low=True)
    lambda_dm: float = _setting(_DEFAULT["lambda_dm"], "λ_dm", "λ_dm", "number", low=0, high=1000)
    tau: float = _setting(_DEFAULT["tau"], "τ (shift)", "τ", "number", low=0, high=10, open_low=True)
    rounds: int = _setting(_DEFAULT["rounds"], "Rounds (recurring)", "rounds", "whole", low=1, high=10)
    device: str = _setting("cpu", "Device", "device", "choice", choices=_devices, preset=False)
    # every method's: fp32, tf32 (CUDA only; on the CPU as fp32) or bf16 autocast
    precision: str = _setting(
        COMMON_DEFAULTS["precision"], "Precision", "precision", "choice", choices=lambda: PRECISIONS, preset=False
    )
    # a user's upload (``data`` = ``upload:<folder>``): its images as they are, or through the corruptions; its labels
    # from its class folders, or none
    upload_streams: str = _setting(
        AS_IS, "Your images stream", "how your images stream", "choice", choices=lambda: UPLOAD_STREAMS, preset=False
    )
    upload_labels: str = _setting(
        LABELS[0], "Labels of your images", "labels", "choice", choices=lambda: LABELS, preset=False
    )
    data: str = _DEFAULT["data"]  # the backbone's own, or ``upload:<folder>``: not a setting of its own

    @classmethod
    def from_preset(cls, preset: str = "default", backbone: str = BUILTIN, device: str = "cpu") -> LabConfig:
        """The settings of a story preset (``imse.defaults.PRESETS``) for ``backbone``."""
        return cls(**lab_settings(preset, backbone), device=device)


def lab_settings_declared() -> dict[str, Setting]:
    """Every run setting by name, in ``LabConfig``'s (and ``/start``'s) order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(LabConfig) if "setting" in f.metadata}


def _shown(value: Any) -> str:
    try:
        return reprlib.repr(value)
    except Exception:  # e.g. an int beyond Python's 4300-digit str limit
        return f"a {type(value).__name__}"


def _listed(values: list) -> str:
    more = f" and {len(values) - 5} more" if len(values) > 5 else ""
    return ", ".join(_shown(v) for v in values[:5]) + more


def _within(setting: Setting, value: Any) -> bool:
    above = setting.low < value if setting.open_low else setting.low <= value
    return above and value <= setting.high


def _problem(setting: Setting, value: Any) -> str | None:
    """What is wrong with one setting's value (``None``: nothing), in the user's words."""
    if setting.kind == "whole":
        whole = isinstance(value, int) and not isinstance(value, bool)
        return (
            None if whole and _within(setting, value) else f"{setting.said} must be {setting.low} to {setting.high:,}"
        )
    if setting.kind == "number":
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        real = real and not (isinstance(value, float) and not math.isfinite(value))  # an int may exceed float
        if real and _within(setting, value):
            return None
        return f"{setting.said} must be in {'(' if setting.open_low else '['}{setting.low:g}, {setting.high:g}]"
    allowed = tuple(setting.choices())
    if setting.kind == "choice":
        if isinstance(value, str) and value in allowed:
            return None
        if isinstance(value, str) and setting.other is not None:
            return setting.other(value)
        return f"{setting.said} must be one of {', '.join(allowed)}, got {_shown(value)}"
    return _names_problem(setting, value, allowed)


def _names_problem(setting: Setting, value: Any, allowed: tuple) -> str | None:
    if not isinstance(value, (tuple, list)):
        return f"{setting.said}s must be a list of names, got {_shown(value)}"
    if not value:
        return f"choose at least one {setting.said}"
    if unknown := [v for v in value if not (isinstance(v, str) and v in allowed)]:
        return f"unknown {setting.said}(s): {_listed(unknown)}; choose from {_listed(list(allowed))}"
    if setting.unique and len(set(value)) < len(value):
        twice = sorted({v for v in value if value.count(v) > 1})
        return f"each {setting.said} once: {_listed(twice)} chosen more than once"
    return None


def run_images(config: LabConfig) -> int:
    """How many images the run streams: every domain of its scenario, ``per_domain`` each (a user's own domain, as
    it is: at most its images)."""
    rounds = config.rounds if config.scenario == "recurring" else 1
    folder = upload_folder(config.data)
    if folder is not None and config.upload_streams == AS_IS:
        return rounds * sum(min(config.per_domain, size) for size in load_prepared(folder).domain_sizes())
    domains = len(config.corruptions) * (len(GRADUAL_SEVERITIES) if config.scenario == "gradual" else 1)
    return domains * rounds * config.per_domain


def _data_problems(config: LabConfig, source_size: int | None) -> list[str]:
    """The data against the backbone: its own (an ImageNet-1k classifier's, for Imagenette's labels), or an upload
    prepared for this backbone; and enough images for the domains."""
    folder = upload_folder(config.data)
    if folder is not None:
        problems = _upload_problems(config, folder)
    elif config.data != (expected := backbone_data(config.backbone)):
        problems = [f"data must be {expected!r} for backbone {config.backbone!r}, got {_shown(config.data)}"]
    else:
        problems = _own_data_problems(config)
    as_is = folder is not None and config.upload_streams == AS_IS  # each domain streams what it has
    if not problems and not as_is and source_size is not None and config.per_domain > source_size:
        problems.append(f"images per domain must be at most {source_size} (the data has {source_size} images)")
    return problems


def _own_data_problems(config: LabConfig) -> list[str]:
    """A timm tag outside the cards has ImageNet-1k's data (Imagenette) only if it classifies ImageNet-1k."""
    if config.data != IMAGENET_DATA or backbone_card(config.backbone) is not None:
        return []
    from imse.data.vit_tags import inspect_vit

    info = inspect_vit(config.backbone)
    if info.imagenet_1k:
        return []
    return [
        f"{config.backbone} classifies {info.num_classes:,} classes ({info.imagenet_subset}), not ImageNet-1k's, "
        "which its own data (Imagenette) is labelled with: run it on your images"
    ]


def _upload_problems(config: LabConfig, folder: str) -> list[str]:
    """An upload must have been prepared for this backbone; as it is, it has no severities to step through."""
    from imse.data.models import model_view

    try:
        upload = load_prepared(folder)
    except FileNotFoundError as error:
        return [str(error)]
    view = model_view(config.backbone)
    if upload.manifest.get("classes_id") != view.classes_id or upload.size != view.input_size:
        return [f"your images were prepared for another model: upload them again for {config.backbone}"]
    if config.upload_streams == AS_IS and config.scenario == "gradual":
        return [
            "the gradual scenario steps through corruption severities; your images as they are have none: choose "
            "single, continual or recurring, or stream your images through the corruptions"
        ]
    return []


def validate(config: LabConfig, source_size: int | None = None) -> LabConfig:
    """Readable ``ValueError`` for anything impossible, before any work starts: each setting against its
    declaration, then the combinations (backbone and data, the data's size, the run's total size). Whatever the
    fields hold (the app's API passes on any JSON value), it raises nothing else; user values are cut short."""
    problems = [
        problem
        for name, setting in lab_settings_declared().items()
        if (problem := _problem(setting, getattr(config, name))) is not None
    ]
    if not problems:
        problems += _data_problems(config, source_size)
    if not problems and run_images(config) > MAX_IMAGES:
        problems.append(f"this run would stream {run_images(config):,} images; the limit is {MAX_IMAGES:,}")
    if problems:
        raise ValueError("; ".join(problems))
    return config
