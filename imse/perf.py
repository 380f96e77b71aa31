"""Speed benchmarks behind ``python -m imse perf``: ratios measured in one run against a baseline in the same run.

Machines here are shared and noisy, so every figure is a median over repeats, the two sides of a ratio are
timed interleaved (A, B, A, B, ...), and only ratios are compared with targets.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .methods import create
from .spectral import get_code, inject, merge, set_code

__all__ = ["run_perf"]


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


def bench_merged_forward(device: torch.device, batch: int, repeats: int, model_name: str) -> dict:
    """Adapted-then-merged IMSE model vs the plain timm model: inference cost once the code is folded in."""
    plain = _vit(model_name, device)
    adapted = copy.deepcopy(plain)
    inject(adapted)
    code = {name: s * (1 + 0.01 * torch.randn_like(s)) for name, s in get_code(adapted).items()}
    set_code(adapted, code)  # a non-trivial code, as after adaptation
    merge(adapted)
    x = torch.randn(batch, 3, 224, 224, device=device)

    def forward(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    t = _time_interleaved({"plain": forward(plain), "merged": forward(adapted)}, repeats, 3, device)
    return {
        "model": model_name,
        "batch": batch,
        "plain_forward_s": t["plain"],
        "merged_forward_s": t["merged"],
        "ratio": t["merged"] / t["plain"],
        "target": 1.03,
    }


def bench_step(device: torch.device, batch: int, repeats: int, model_name: str) -> dict:
    """One IMSE adaptation step vs one SAR step (both two SAM passes) on the same batch.

    A random-init model predicts near-uniformly, so no sample would pass ``H < 0.4 ln C`` and both methods
    would skip their updates; ``margin=1.0`` (``E0 = ln C``) keeps every sample so both do full updates.
    """
    imse = create("imse", _vit(model_name, device), margin=1.0)
    sar = create("sar", _vit(model_name, device), margin=1.0, batch_size=batch)
    x = torch.randn(batch, 3, 224, 224, device=device)
    t = _time_interleaved({"sar": lambda: sar(x), "imse": lambda: imse(x)}, repeats, 2, device)
    return {
        "model": model_name,
        "batch": batch,
        "sar_step_s": t["sar"],
        "imse_step_s": t["imse"],
        "ratio": t["imse"] / t["sar"],
        "target": 1.6,
        "both_updated": bool(imse.last_record["updated"] and sar.last_record["updated"]),
        "imse_trainable": imse.num_trainable(),
        "sar_trainable": sar.num_trainable(),
    }


def bench_svd(device: torch.device, repeats: int, model_name: str) -> dict:
    """One-time cost of decomposing every target layer (float64 SVD), what a user waits for at start-up."""
    times = []
    for _ in range(repeats):
        model = _vit(model_name, device)
        _sync(device)
        start = time.perf_counter()
        names = inject(model)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"model": model_name, "layers": len(names), "inject_s": statistics.median(times), "repeats": repeats}


def run_perf(
    device: str = "cpu",
    repeats: int = 10,
    batch: int = 16,
    only: tuple[str, ...] = ("merged", "step", "svd"),
    out: str | None = None,
) -> dict:
    """Run the selected benchmarks, print a table, optionally write JSON; returns the results."""
    dev = torch.device(device)
    results: dict[str, Any] = {
        "versions": {"imse": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    if "merged" in only:
        results["merged_forward"] = bench_merged_forward(dev, batch, repeats, "vit_small_patch16_224")
    if "step" in only:
        results["adaptation_step"] = bench_step(dev, batch, repeats, "vit_small_patch16_224")
    if "svd" in only:
        results["svd"] = bench_svd(dev, max(1, repeats // 5), "vit_base_patch16_224")
    print(format_table(results))
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    rows = [("measure", "median", "ratio", "target")]
    if "merged_forward" in results:
        r = results["merged_forward"]
        rows.append(
            (
                f"merged IMSE fwd / timm fwd ({r['model']}, b{r['batch']})",
                f"{r['merged_forward_s'] * 1e3:.1f} / {r['plain_forward_s'] * 1e3:.1f} ms",
                f"{r['ratio']:.3f}",
                f"<= {r['target']}",
            )
        )
    if "adaptation_step" in results:
        r = results["adaptation_step"]
        rows.append(
            (
                f"IMSE step / SAR step ({r['model']}, b{r['batch']})",
                f"{r['imse_step_s'] * 1e3:.0f} / {r['sar_step_s'] * 1e3:.0f} ms",
                f"{r['ratio']:.3f}",
                f"<= {r['target']}",
            )
        )
    if "svd" in results:
        r = results["svd"]
        rows.append((f"SVD inject ({r['model']}, {r['layers']} layers)", f"{r['inject_s']:.2f} s", "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"device: {results['device']} ({results['device_name']}), torch threads {results['threads']}"]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
