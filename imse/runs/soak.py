"""Soak test behind ``python -m imse soak``: a long gradual stream through the app's own run loop, checking what
a server that stays up for days needs — nothing non-finite in any record, memory flat, the bank within its
capacity."""

from __future__ import annotations

import math
import time
from typing import Any

from imse.data.corruptions import CORRUPTIONS
from imse.runs.lab import LabConfig, run_lab
from imse.runs.memory import release_memory, resident_bytes

__all__ = ["non_finite_paths", "run_soak"]


def non_finite_paths(value: Any, path: str = "") -> list[str]:
    """Where a record holds NaN or ±inf (floats, lists, dicts, tensors), as readable paths."""
    import torch

    if isinstance(value, float):
        return [] if math.isfinite(value) else [path or "."]
    if isinstance(value, torch.Tensor):
        return [] if not value.is_floating_point() or torch.isfinite(value).all() else [path or "."]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in non_finite_paths(item, f"{path}.{key}")]
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in non_finite_paths(item, f"{path}[{i}]")]
    return []


def run_soak(
    *,
    per_domain: int = 64,
    corruptions: tuple[str, ...] = CORRUPTIONS,
    methods: tuple[str, ...] = ("IMSE + retrieval (top-1)", "Source"),
    scenario: str = "gradual",
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Stream the run and report resident memory after every domain, non-finite record values and bank sizes."""
    config = LabConfig(
        scenario=scenario,
        corruptions=tuple(corruptions),
        methods=tuple(methods),
        per_domain=per_domain,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    started = time.perf_counter()
    memory: list[int] = []  # resident bytes when each domain has ended
    domains_seen = 0
    state = None
    for state in run_lab(config, min_interval=0.0, thumbnails=1):
        finished_domains = len(state.domains) - (0 if state.finished else 1)
        while domains_seen < finished_domains:
            release_memory()
            memory.append(resident_bytes())
            domains_seen += 1
    imse_methods = [method for method in state.final_methods.values() if method.name == "imse"]
    capacity = max((method.hparams["bank_capacity"] for method in imse_methods), default=None)
    bad = [p for i, record in enumerate(state.records) for p in non_finite_paths(record, f"records[{i}]")]
    return {
        "config": {
            "scenario": scenario,
            "per_domain": per_domain,
            "batch_size": batch_size,
            "seed": seed,
            "methods": list(methods),
            "corruptions": list(corruptions),
            "device": device,
        },  # fmt: skip
        "domains": len(state.domains),
        "images": state.images,
        "seconds": time.perf_counter() - started,
        "rss_after_first_domain": memory[0],
        "rss_at_end": memory[-1],
        "rss_growth": memory[-1] / memory[0] - 1,
        "rss_per_domain": memory,
        "non_finite": bad[:20],
        "non_finite_count": len(bad),
        "bank_capacity": capacity,
        "bank_max": max(state.bank_size, default=0),
        "accuracy": {label: entry["mean_accuracy"] for label, entry in state.summary.items()},
    }
