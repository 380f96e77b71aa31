"""A Lab run's settings and their checks: ``LabConfig`` (the default run's values) and ``validate``.

Kept apart from the run itself (``imse.runs.lab``): the UI, the API and the ZeroGPU sizing read the settings and
their limits without the run's machinery.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

import torch

from imse.core.methods.base import COMMON_DEFAULTS, PRECISIONS
from imse.data.corruptions import ALL_CORRUPTIONS
from imse.data.models import BUILTIN, HUB_BACKBONES
from imse.data.streams import SCENARIOS
from imse.runs.defaults import lab_settings, method_choices

__all__ = ["MAX_BATCH", "MAX_IMAGES", "LabConfig", "validate"]

MAX_IMAGES = 200_000  # per run: keeps a public Space's runs bounded
MAX_BATCH = 256
_DEFAULT = lab_settings()


@dataclass
class LabConfig:
    """One Lab run's settings; the defaults are the default run's (``imse.defaults.lab_settings``)."""

    backbone: str = _DEFAULT["backbone"]
    scenario: str = _DEFAULT["scenario"]
    corruptions: tuple[str, ...] = _DEFAULT["corruptions"]
    severity: int = _DEFAULT["severity"]
    methods: tuple[str, ...] = _DEFAULT["methods"]
    batch_size: int = _DEFAULT["batch_size"]
    per_domain: int = _DEFAULT["per_domain"]
    seed: int = _DEFAULT["seed"]
    imse_lr: float = _DEFAULT["imse_lr"]  # the validation sweep's choice for the built-in backbone
    lambda_dm: float = _DEFAULT["lambda_dm"]
    tau: float = _DEFAULT["tau"]
    device: str = "cpu"
    rounds: int = _DEFAULT["rounds"]
    data: str = _DEFAULT["data"]
    # every method's: fp32, tf32 (CUDA only; on the CPU as fp32) or bf16 autocast
    precision: str = COMMON_DEFAULTS["precision"]

    @classmethod
    def from_preset(cls, preset: str = "default", backbone: str = BUILTIN, device: str = "cpu") -> LabConfig:
        """The settings of a story preset (``imse.defaults.PRESETS``) for ``backbone``."""
        return cls(**lab_settings(preset, backbone), device=device)


def validate(config: LabConfig, source_size: int | None = None) -> LabConfig:
    """Readable ``ValueError`` for anything impossible, before any work starts: each field's type, range or
    allowed values, then the combinations (backbone and data, the run's total size). Whatever the fields hold
    (the app's API passes on any JSON value), it raises nothing else; user values in messages are cut short."""

    def shown(value: Any) -> str:
        try:
            return reprlib.repr(value)
        except Exception:  # e.g. an int beyond Python's 4300-digit str limit
            return f"a {type(value).__name__}"

    def listed(values: list) -> str:
        more = f" and {len(values) - 5} more" if len(values) > 5 else ""
        return ", ".join(shown(v) for v in values[:5]) + more

    def whole(value: Any, low: int, high: float = math.inf) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def real(value: Any, low: float, high: float, open_low: bool = False) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (low < value if open_low else low <= value) and value <= high

    def choice(value: Any, allowed) -> bool:
        return isinstance(value, str) and value in allowed

    problems = []
    backbones = (BUILTIN, *HUB_BACKBONES)
    if not choice(config.backbone, backbones):
        problems.append(f"unknown backbone {shown(config.backbone)}; choose one of {', '.join(backbones)}")
    elif config.data != (expected := BUILTIN if config.backbone == BUILTIN else "imagenette"):
        problems.append(f"data must be {expected!r} for backbone {config.backbone!r}, got {shown(config.data)}")
    if not choice(config.scenario, SCENARIOS):
        problems.append(f"scenario must be one of {', '.join(SCENARIOS)}")
    if not isinstance(config.corruptions, (tuple, list)):
        problems.append(f"corruptions must be a list of names, got {shown(config.corruptions)}")
    elif not config.corruptions:
        problems.append("choose at least one corruption")
    elif unknown := [c for c in config.corruptions if not choice(c, ALL_CORRUPTIONS)]:
        problems.append(f"unknown corruption(s): {listed(unknown)}")
    if not whole(config.severity, 1, 5):
        problems.append("severity must be 1 to 5")
    if not isinstance(config.methods, (tuple, list)):
        problems.append(f"methods must be a list of method names, got {shown(config.methods)}")
    elif not config.methods:
        problems.append("choose at least one method")
    elif bad := [m for m in config.methods if not choice(m, method_choices())]:
        problems.append(f"unknown method(s): {listed(bad)}; choose from {', '.join(method_choices())}")
    elif len(set(config.methods)) < len(config.methods):
        twice = sorted({m for m in config.methods if config.methods.count(m) > 1})
        problems.append(f"each method once: {listed(twice)} chosen more than once")
    if not whole(config.batch_size, 1, MAX_BATCH):
        problems.append(f"batch size must be 1 to {MAX_BATCH}")
    if not whole(config.per_domain, 1, MAX_IMAGES):
        problems.append(f"images per domain must be 1 to {MAX_IMAGES:,}")
    elif source_size is not None and config.per_domain > source_size:
        problems.append(f"images per domain must be at most {source_size} (the data has {source_size} images)")
    if not whole(config.seed, 0, 2**32 - 1):  # the stream derives generator seeds from it: keep them in range
        problems.append(f"seed must be a whole number from 0 to {2**32 - 1}")
    if not real(config.imse_lr, 0, 1, open_low=True):
        problems.append("IMSE lr must be in (0, 1]")
    if not real(config.lambda_dm, 0, 1000):
        problems.append("λ_dm must be in [0, 1000]")
    if not real(config.tau, 0, 10, open_low=True):
        problems.append("τ must be in (0, 10]")
    if not whole(config.rounds, 1, 10):
        problems.append("rounds must be 1 to 10")
    if not choice(config.device, ("cpu", "cuda")) or (config.device == "cuda" and not torch.cuda.is_available()):
        problems.append(f"device must be 'cpu' (or 'cuda' when a GPU is present), got {shown(config.device)}")
    if not choice(config.precision, PRECISIONS):
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {shown(config.precision)}")
    if not problems:
        domains = len(config.corruptions) * (9 if config.scenario == "gradual" else 1)
        domains *= config.rounds if config.scenario == "recurring" else 1
        if domains * config.per_domain > MAX_IMAGES:
            problems.append(
                f"this run would stream {domains * config.per_domain:,} images; the limit is {MAX_IMAGES:,}"
            )
    if problems:
        raise ValueError("; ".join(problems))
    return config
