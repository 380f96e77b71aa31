"""Timing that survives a noisy shared machine (synchronised devices, interleaved repeats, medians), and the row
every benchmark result carries: what it measured, against which target, and whether it met it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each function, calls interleaved so that load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _vit(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).to(device).eval()


def check(measure: str, median: str, ratio: str, target: str, met: bool | None) -> dict:
    """One row of the perf table, stored in the benchmark's own result (``result["checks"]``) so that the JSON
    says what each number was held to; ``met`` is None for a number that is reported, not held to a target."""
    return {"measure": measure, "median": median, "ratio": ratio, "target": target, "met": met}
