"""Speed benchmarks behind ``python -m imse perf``: ratios measured in one run against a baseline in the same run.

Machines here are shared and noisy, so every figure is a median over repeats, the two sides of a ratio are
timed interleaved (A, B, A, B, ...), and only ratios are compared with targets. One module per kind of
benchmark (``steps``, ``memory``, ``data``, ``app``), the cost model of the step ratio in ``floors``, the
timing helpers in ``timing``; this module runs the selection and renders the table.
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
from imse.perf.steps import bench_merged_forward, bench_precision, bench_small_batch, bench_step

__all__ = ["ALL_BENCHMARKS", "STEP_MODELS", "format_table", "run_perf", "step_floor"]

ALL_BENCHMARKS = (
    "merged", "step", "small", "precision", "svd", "memory", "stream", "corruptions", "lab", "startup"
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

    ``batch`` is the adaptation batch of the step, memory and stream benchmarks; ``models`` the ViTs of the
    step benchmark (the small-batch one runs the first at batch 1 and ``batch``, the others at batch 1; the
    bf16 one the last at ``batch``, and ``per_domain`` images per corruption for its accuracy comparison).
    """
    unknown = set(only) - set(ALL_BENCHMARKS)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(ALL_BENCHMARKS)}")
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
        results["lab"] = bench_lab(dev)
    if "startup" in only:
        results["startup"] = bench_startup()
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
    for r in results.get("adaptation_step", []):
        rows.append(
            (
                f"IMSE step / SAR step ({r['model']}, b{r['batch']}; GEMM floor {r['floor_ratio']:.3f})",
                f"{r['imse_step_s'] * 1e3:.0f} / {r['sar_step_s'] * 1e3:.0f} ms",
                f"{r['ratio']:.3f}",
                f"<= {r['target']:.3f} (floor x 1.1)",
            )
        )
    for r in results.get("small_batch", []):
        target = ">= 3x" if r["batch"] == 1 else ">= 1x"
        for kind in ("step", "inference"):
            rows.append(
                (
                    f"{kind}: rebuild-every-forward / ours ({r['model']}, b{r['batch']})",
                    f"{r[f'{kind}_reference_s'] * 1e3:.0f} / {r[f'{kind}_ours_s'] * 1e3:.0f} ms",
                    f"{r[f'{kind}_speedup']:.2f}x",
                    target,
                )
            )
    if "precision" in results:
        r = results["precision"]
        a = r["accuracy"]
        rows.append(
            (
                f"bf16 IMSE step / bf16 SAR step ({r['model']}, b{r['batch']}; GEMM floor {r['floor_ratio']:.3f})",
                f"{r['imse_bf16_step_s'] * 1e3:.0f} / {r['sar_bf16_step_s'] * 1e3:.0f} ms",
                f"{r['ratio']:.3f}",
                "reported",
            )
        )
        rows.append(
            (
                f"bf16 IMSE images/s; fp32 / bf16 IMSE step ({r['model']}, b{r['batch']})",
                f"{r['imse_bf16_images_per_s']:.1f} img/s; {r['imse_fp32_step_s'] * 1e3:.0f} ms fp32",
                f"{r['bf16_speedup']:.2f}x",
                "reported",
            )
        )
        rows.append(
            (
                f"IMSE accuracy bf16 - fp32 ({a['stream']})",
                f"{100 * a['bf16_mean']:.2f} / {100 * a['fp32_mean']:.2f} %",
                f"{a['difference_points']:+.2f} pt",
                f"|diff| <= {a['target_points']} pt",
            )
        )
    if "svd" in results:
        r = results["svd"]
        rows.append((f"SVD inject ({r['model']}, {r['layers']} layers), no cache", f"{r['inject_s']:.2f} s", "-", "-"))
        rows.append(
            (
                "SVD inject: cold (cache miss) / warm (hit)",
                f"{r['cold_cached_s']:.2f} / {r['warm_s']:.2f} s",
                f"{r['warm_speedup']:.1f}x",
                f">= {r['target_speedup']:.0f}x",
            )
        )
    if "memory" in results:
        r = results["memory"]
        rows.append(
            (
                f"params+buffers: injected / original ({r['model']}; floor {r['floor_ratio']:.3f})",
                f"{r['injected_bytes'] / 2**20:.0f} / {r['original_bytes'] / 2**20:.0f} MiB",
                f"{r['ratio']:.3f}",
                f"<= {r['target']}",
            )
        )
        rows.append(
            (
                f"peak memory of a step: IMSE / SAR ({r['model']}, b{r['step_batch']})",
                f"{r['imse_step_peak_bytes'] / 2**20:.0f} / {r['sar_step_peak_bytes'] / 2**20:.0f} MiB",
                f"{r['step_peak_ratio']:.2f}",
                "reported",
            )
        )
    if "stream" in results:
        r = results["stream"]
        rows.append(
            (
                f"corrupt a batch / IMSE step ({r['model']}, b{r['batch']}, {r['size']} px, worst: {r['worst']})",
                f"{r['per_corruption'][r['worst']]['corrupt_s'] * 1e3:.1f} / {r['imse_step_s'] * 1e3:.0f} ms",
                f"{r['worst_share']:.3f}",
                f"<= {r['target']}",
            )
        )
    if "corruptions" in results:
        r = results["corruptions"]
        for name, row in r["per_corruption"].items():
            reference = (
                f" / {row['reference_s'] * 1e3:.0f} ms (corrupt-tta, per image, CPU)" if "reference_s" in row else ""
            )
            rows.append(
                (
                    f"corrupt {name} ({r['batch']}x{r['size']}px, s{r['severity']})",
                    f"{row['ours_s'] * 1e3:.0f} ms{reference}",
                    f"{row['speedup']:.1f}x" if "speedup" in row else "-",
                    "-",
                )
            )
        if "median_speedup" in r:
            rows.append(
                (
                    "corruptions: median / slowest speedup vs reference",
                    "",
                    f"{r['median_speedup']:.1f}x / {r['slowest_speedup']:.1f}x",
                    ">= 5x / >= 1x",
                )
            )
        else:
            rows.append(("corruptions vs reference", "pip install corrupt-tta to compare", "-", "-"))
    if "lab" in results:
        r = results["lab"]
        rows.append(("app: first panel update (warm)", f"{r['first_update_s']:.2f} s", "-", "<= 5 s"))
        rows.append(
            (
                f"app: the default run, {r['images']:,} images of {', '.join(r['config']['methods'])} "
                f"({r['updates']} updates)",
                f"{r['total_s']:.1f} s",
                "-",
                "<= 120 s",
            )
        )
        rows.append(
            (
                "app: one update's figures (median build, payload)",
                f"{r['figures_median_s'] * 1e3:.1f} ms, {r['last_payload_bytes'] / 1e3:.0f} KB",
                "-",
                "<= 20 ms, <= 200 KB",
            )
        )
    if "startup" in results:
        r = results["startup"]
        if "skipped" in r:
            rows.append(("app cold start", r["skipped"], "-", "reported"))
        else:
            page = f", page ready {r['page_ready_s']:.1f} s" if "page_ready_s" in r else " (no chromium: HTTP only)"
            rows.append(("app cold start: process to HTTP 200 / page", f"{r['server_ready_s']:.1f} s{page}", "-",
                         "reported"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"device: {results['device']} ({results['device_name']}), torch threads {results['threads']}"]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
