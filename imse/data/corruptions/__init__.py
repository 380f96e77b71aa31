"""The ImageNet-C corruptions as one batched, seeded function: ``corrupt(images, name, severity)``.

Images are uint8 ``[B, 3, H, W]`` tensors on any device and come back as uint8 of the same shape on the same
device; all work happens there, batched (no per-image Python loop on the hot path except where noted in a
function's docstring). Each image in a batch draws its own random values.

Parameter tables (``tables.py``) come from Hendrycks' generators: the CIFAR-10-C table is used for images up to
84 px on their shorter side (the geometric mean of 32 and 224), the ImageNet-C table above that; pass
``table="cifar"`` or ``"imagenet"`` to choose. Pixel-unit parameters are not rescaled for sizes in between.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from imse.data.corruptions import blur, digital, noise, weather
from imse.data.corruptions.ops import Draws
from imse.data.corruptions.tables import TABLES

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "REGISTRY",
    "VALIDATION_CORRUPTIONS",
    "KINDS",
    "Corruption",
    "corrupt",
    "corruption_names",
    "table_for_size",
]


# A corruption's kind: one of ImageNet-C's 15, reported (``test``); one of the 4 held out for choosing
# hyper-parameters, never reported (``validation``); or any other, registered later (``extra``: offered in the Lab and
# bench, never part of the paper's protocol, ``reproduce --imagenet-c`` or the sweep). The first two are fixed sets.
KINDS = ("test", "validation", "extra")


@dataclass(frozen=True)
class Corruption:
    """One corruption: its batched function (``function(x, params, draws, table)``, see the family modules), the
    parameters of severities 1..5 per table (``"cifar"``, ``"imagenet"``), and its kind (``KINDS``): a corruption
    registered later is ``extra`` unless it says otherwise."""

    name: str
    function: Callable
    severities: Mapping[str, tuple]
    kind: str = "extra"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def held_out(self) -> bool:
        return self.kind == "validation"


def _tabled(function: Callable, kind: str = "extra") -> Corruption:
    """A corruption whose severities are Hendrycks' rows in ``tables.py``, under the function's name."""
    name = function.__name__
    return Corruption(name, function, {table: rows[name] for table, rows in TABLES.items()}, kind)


# The registry: ImageNet-C's 15 test corruptions in its standard order (the continual-TTA protocol's order), then the
# 4 held out for choosing hyper-parameters, never for reporting; a corruption added later goes after them (extra).
REGISTRY: dict[str, Corruption] = {
    corruption.name: corruption
    for corruption in (
        _tabled(noise.gaussian_noise, "test"),
        _tabled(noise.shot_noise, "test"),
        _tabled(noise.impulse_noise, "test"),
        _tabled(blur.defocus_blur, "test"),
        _tabled(blur.glass_blur, "test"),
        _tabled(blur.motion_blur, "test"),
        _tabled(blur.zoom_blur, "test"),
        _tabled(weather.snow, "test"),
        _tabled(weather.frost, "test"),
        _tabled(weather.fog, "test"),
        _tabled(digital.brightness, "test"),
        _tabled(digital.contrast, "test"),
        _tabled(digital.elastic_transform, "test"),
        _tabled(digital.pixelate, "test"),
        _tabled(digital.jpeg_compression, "test"),
        _tabled(noise.speckle_noise, "validation"),
        _tabled(blur.gaussian_blur, "validation"),
        _tabled(weather.spatter, "validation"),
        _tabled(digital.saturate, "validation"),
    )
}


def corruption_names(split: str = "all") -> tuple[str, ...]:
    """The registered corruptions of a kind, in the registry's order: ``"test"`` (ImageNet-C's 15), ``"validation"``
    (the 4 held out), ``"extra"`` (registered later) or ``"all"``."""
    if split not in ("all", *KINDS):
        raise ValueError(f"split must be 'all', 'test', 'validation' or 'extra', got {_shown(split)}")
    return tuple(name for name, corruption in REGISTRY.items() if split in ("all", corruption.kind))


# The names as registered at import, for the code that lists them
CORRUPTIONS: tuple[str, ...] = corruption_names("test")
VALIDATION_CORRUPTIONS: tuple[str, ...] = corruption_names("validation")
ALL_CORRUPTIONS: tuple[str, ...] = corruption_names("all")
_CIFAR_MAX_SIDE = math.sqrt(32 * 224)  # ≈ 84.7: nearer to 32 than to 224 on a log scale


def _shown(value: object) -> str:
    """A user's value in an error message, cut short (a megabyte of text stays out of the message)."""
    try:
        return reprlib.repr(value)
    except Exception:  # e.g. an int beyond Python's 4300-digit str limit
        return f"a {type(value).__name__}"


def table_for_size(height: int, width: int) -> str:
    """The parameter table made for images of this size: ``"cifar"`` up to 84 px (shorter side), else
    ``"imagenet"``."""
    return "cifar" if min(height, width) <= _CIFAR_MAX_SIDE else "imagenet"


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    table: str | None = None,
) -> torch.Tensor:
    """Corrupt a batch. ``generator`` (on any device) makes the draws reproducible; ``None`` uses torch's
    global RNG. Raises ``ValueError`` for an unknown name, a severity outside 1..5, or a bad table name, and
    ``TypeError``/``ValueError`` for anything but a dense uint8 ``[B, 3, H, W]`` tensor of at least 2×2 pixels, or a
    ``generator`` that is not a ``torch.Generator``. Nothing else: every check comes before any work."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown corruption {_shown(name)}; choose from {', '.join(REGISTRY)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {_shown(severity)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.layout != torch.strided or images.is_meta:
        raise TypeError(f"images must be a dense tensor holding data, got {images.layout} on {images.device}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height < 2 or width < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {height}x{width}")
    table = table or table_for_size(height, width)
    if not isinstance(table, str) or table not in TABLES:
        raise ValueError(f"unknown table {_shown(table)}; choose from {sorted(TABLES)}")
    if images.shape[0] == 0:
        return images.clone()
    params = REGISTRY[name].severities[table][severity - 1]
    draws = Draws(generator, images.device)
    function = REGISTRY[name].function
    if getattr(function, "works_on_uint8", False):
        return function(images, params, draws, table)
    out = function(images.to(torch.float32).div_(255), params, draws, table)
    # The original generators store np.uint8(values · 255): truncation (what the uint8 cast does for values
    # >= 0). The small offset absorbs float32 error on values that are exact integers in float64.
    return out.mul(255).add_(1e-3).clamp_(0, 255).to(torch.uint8)
