"""Speed benchmarks behind ``python -m imse perf``: ratios measured in one run against a baseline in the same run.

Machines here are shared and noisy, so every figure is a median over repeats, the two sides of a ratio are
timed interleaved (A, B, A, B, ...), and only ratios are compared with targets. One module per kind of
benchmark (``steps``, ``memory``, ``data``, ``app``), each returning a result that carries its own rows and
targets (``checks``); the cost model of the step ratio in ``floors``, the timing helpers in ``timing``; this
module runs the selection and renders the table from those rows. ``suite`` (with ``suite_costs``, ``suite_pieces``,
``suite_run``) runs them all as one planned, budgeted GPU run, with the accuracy per precision (``accuracy``), the
Lab's default runs (``lab_runs``) and the CUDA tests (``cuda_tests``): ``perf --suite``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from imse import __version__
from imse.perf.app import bench_lab, bench_startup
from imse.perf.data import bench_corruptions, bench_stream, bench_svd
from imse.perf.floors import step_floor
from imse.perf.memory import bench_memory
from imse.perf.methods import bench_methods
from imse.perf.steps import bench_merged_forward, bench_precision, bench_small_batch, bench_step
from imse.perf.teach import bench_teach

__all__ = ["ALL_BENCHMARKS", "STEP_MODELS", "checks_of", "environment", "format_table", "run_perf", "step_floor"]

ALL_BENCHMARKS = (
    "merged", "step", "small", "precision", "svd", "memory", "stream", "corruptions", "lab", "startup", "teach",
    "methods",
)  # fmt: skip
STEP_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")


def run_perf(
    *,
    device: str = "cpu",
    repeats: int = 5,
    batch: int = 64,
    only: tuple[str, ...] = ALL_BENCHMARKS,
    out: str | None = None,
    models: tuple[str, ...] = STEP_MODELS,
    per_domain: int = 1000,
) -> dict:
    """Run the selected benchmarks, print a table, optionally write JSON; returns the results.

    ``batch`` is the adaptation batch of the step, methods, memory and stream benchmarks; ``models`` the ViTs of
    the step and methods benchmarks (``builtin`` too for the methods one; the small-batch one runs the first at
    batch 1 and ``batch``, the others at batch 1; the bf16 one the last at ``batch``, and ``per_domain`` images
    per corruption for its accuracy comparison).
    """
    unknown = set(only) - set(ALL_BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(ALL_BENCHMARKS)}")
    dev = torch.device(device)
    results: dict[str, Any] = {**environment(dev), "repeats": repeats}
    if "merged" in only:
        results["merged_forward"] = bench_merged_forward(dev, batch, repeats, "vit_small_patch16_224")
    if "step" in only:
        results["adaptation_step"] = [bench_step(dev, batch, repeats, name) for name in models]
    if "small" in only:
        runs = [(models[0], 1), (models[0], batch)] + [(name, 1) for name in models[1:]]
        results["small_batch"] = [bench_small_batch(dev, repeats, name, b) for name, b in runs]
    if "precision" in only:
        results["precision"] = bench_precision(dev, batch, repeats, models[-1], per_domain)
    if "svd" in only:
        results["svd"] = bench_svd(dev, max(1, repeats // 3), "vit_base_patch16_224")
    if "memory" in only:
        results["memory"] = bench_memory(dev, batch)
    if "stream" in only:
        results["stream"] = bench_stream(dev, repeats, batch)
    if "corruptions" in only:
        results["corruptions"] = bench_corruptions(dev, max(1, min(repeats, 5)))
    if "lab" in only:
        results["lab"] = bench_lab(dev, repeats=max(1, min(repeats, 3)))
    if "startup" in only:
        results["startup"] = bench_startup()
    if "teach" in only:
        results["teach"] = bench_teach(repeats=max(1, min(repeats, 5)))
    if "methods" in only:
        results["method_steps"] = [bench_methods(dev, batch, repeats, name) for name in models]
    print(format_table(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def environment(device: torch.device) -> dict:
    """What a result was measured with: versions, the device and its name, torch's threads."""
    return {
        "versions": {"imse": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }


def checks_of(results: dict) -> list[dict]:
    """Every benchmark's rows, in the order they ran: each result (or each result of a list) carries its own."""
    rows = []
    for value in results.values():
        for result in value if isinstance(value, list) else [value]:
            if isinstance(result, dict):
                rows.extend(result.get("checks", []))
    return rows


def format_table(results: dict) -> str:
    """The table, rendered only from the checks the results carry (``met``: yes / NO / - for reported)."""
    header = ("measure", "median", "ratio", "target", "met")
    rows = [header]
    for row in checks_of(results):
        met = "-" if row["met"] is None else ("yes" if row["met"] else "NO")
        rows.append((row["measure"], row["median"], row["ratio"], row["target"], met))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"device: {results['device']} ({results['device_name']}), torch threads {results['threads']}"]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
