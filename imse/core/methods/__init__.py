"""Test-time adaptation methods behind one constructor: ``create(name, model, **overrides)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from imse.core.methods.base import SAMEntropyMethod, TTAMethod
from imse.core.methods.dpal import DPAL
from imse.core.methods.imse import IMSE
from imse.core.methods.sar import SAR
from imse.core.methods.source import Source
from imse.core.methods.tent import Tent
from imse.core.methods.vida import ViDA

__all__ = [
    "DPAL",
    "METHODS",
    "IMSE",
    "SAR",
    "SAMEntropyMethod",
    "Source",
    "TTAMethod",
    "Tent",
    "ViDA",
    "adaptive_methods",
    "create",
]

# The registry: a method is its file and its line here; everything else about it is read from its class
# (``TTAMethod``'s class attributes), so the sweep, the Lab's menu, bench, reproduce and perf see a new one at once.
METHODS: dict[str, type[TTAMethod]] = {cls.name: cls for cls in (Source, Tent, SAR, IMSE, ViDA, DPAL)}


def adaptive_methods() -> tuple[str, ...]:
    """The registered methods that adapt (what the sweep tunes and perf times), in registry order."""
    return tuple(name for name, cls in METHODS.items() if cls.adapts)


def create(name: str, model: nn.Module, **overrides: Any) -> TTAMethod:
    """Wrap ``model`` (modified in place) in the named method; ``overrides`` replace its defaults.

    ``record_alignment=True`` adds every spectral layer's alignment std to each step's record.
    """
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[key](model, **overrides)
