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
    """One-time cost of decomposing every target layer (float64 SVD), what a user waits for at start-up: cold
    (no cache: SVD, hashing and writing the cache) and warm (the factors read back from the disk cache)."""
    import tempfile

    from .svd_cache import SVDCache

    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as directory:
            cache = SVDCache(directory)
            for samples in (cold, warm):
                model = _vit(model_name, device)
                _sync(device)
                start = time.perf_counter()
                names = inject(model, cache=cache)
                _sync(device)
                samples.append(time.perf_counter() - start)
            assert cache.hits == len(names) and cache.misses == len(names)
        uncached = _vit(model_name, device)
        start = time.perf_counter()
        inject(uncached)
        _sync(device)
    plain = time.perf_counter() - start
    return {
        "model": model_name,
        "layers": len(names),
        "inject_s": plain,
        "cold_cached_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "warm_speedup": statistics.median(cold) / statistics.median(warm),
        "target_speedup": 10.0,
        "repeats": repeats,
    }


def _benchmark_images(count: int, size: int) -> torch.Tensor:
    """Real photos when scikit-image is installed (the speed of some corruptions, JPEG above all, depends on
    content), else smooth random images."""
    try:
        import numpy as np
        from PIL import Image
        from skimage import data

        names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
        photos = []
        for name in names:
            image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BILINEAR)
            photos.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        return torch.stack([photos[i % len(photos)] for i in range(count)])
    except ImportError:
        generator = torch.Generator().manual_seed(0)
        noise = torch.rand(count, 3, size // 8, size // 8, generator=generator)
        smooth = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        return (smooth.clamp(0, 1) * 255).to(torch.uint8)


def bench_corruptions(device: torch.device, repeats: int, batch: int = 64, size: int = 224, severity: int = 3) -> dict:
    """Batched ``corrupt`` of ``batch`` images vs corrupt-tta applied image by image on the CPU (the reference
    implementation, if installed), per test corruption, median seconds; speedup = reference / ours."""
    from .data.corruptions import CORRUPTIONS, corrupt

    images = _benchmark_images(batch, size)
    on_device = images.to(device)
    try:
        import corrupt_tta
        import numpy as np
    except ImportError:
        corrupt_tta = None
    rows = {}
    for name in CORRUPTIONS:
        generator = torch.Generator(device).manual_seed(0)

        def run(name=name, generator=generator):
            corrupt(on_device, name, severity, generator=generator)

        ours = _time_interleaved({name: run}, repeats, 1, device)
        row = {"ours_s": ours[name]}
        if corrupt_tta is not None:
            arrays = [image.permute(1, 2, 0).numpy() for image in images]
            samples = []
            budget = time.perf_counter() + 20.0  # glass blur's reference takes ~10 s per batch: fewer repeats
            for _ in range(repeats):
                start = time.perf_counter()
                for array in arrays:
                    np.uint8(np.clip(corrupt_tta.corrupt(array, severity=severity, corruption_name=name), 0, 255))
                samples.append(time.perf_counter() - start)
                if time.perf_counter() > budget:
                    break
            row["reference_s"] = statistics.median(samples)
            row["speedup"] = row["reference_s"] / row["ours_s"]
        rows[name] = row
    result = {"batch": batch, "size": size, "severity": severity, "device": str(device), "per_corruption": rows}
    speedups = [row["speedup"] for row in rows.values() if "speedup" in row]
    if speedups:
        result["median_speedup"] = statistics.median(speedups)
        result["slowest_speedup"] = min(speedups)
        result["target"] = "median >= 5, none < 1"
    return result


def bench_lab(device: torch.device, per_domain: int = 500) -> dict:
    """What the app's Start does on the built-in backbone: time to the first panel update (warm: a first tiny
    run loads everything) and the full continual 15-domain run, IMSE compared with Source, figures included."""
    from . import viz
    from .lab import LabConfig, run_lab

    warm = LabConfig(corruptions=("fog",), per_domain=64, device=str(device))
    for _ in run_lab(warm):
        pass
    config = LabConfig(per_domain=per_domain, methods=("IMSE", "Source"), device=str(device))
    started = time.perf_counter()
    first = None
    updates = 0
    figure_seconds = []
    for state in run_lab(config, min_interval=0.5):  # the app's update interval
        built = time.perf_counter()
        figures = [viz.accuracy_figure(state), viz.alignment_figure(state), viz.shift_figure(state)]
        figures += [viz.bank_figure(state), viz.batch_figure(state)]
        payload = sum(len(f.to_json()) for f in figures)
        figure_seconds.append(time.perf_counter() - built)
        updates += 1
        if first is None:
            first = time.perf_counter() - started
    return {
        "first_update_s": first,
        "total_s": time.perf_counter() - started,
        "updates": updates,
        "last_payload_bytes": payload,
        "figures_median_s": statistics.median(figure_seconds),
        "images": state.images,
        "targets": {"first_update_s": 5.0, "total_s": 120.0, "payload_bytes": 200_000},
    }


def run_perf(
    device: str = "cpu",
    repeats: int = 10,
    batch: int = 16,
    only: tuple[str, ...] = ("merged", "step", "svd", "corruptions"),
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
    if "corruptions" in only:
        results["corruptions"] = bench_corruptions(dev, max(1, min(repeats, 5)))
    if "lab" in only:
        results["lab"] = bench_lab(dev)
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
        rows.append((f"SVD inject ({r['model']}, {r['layers']} layers), no cache", f"{r['inject_s']:.2f} s", "-", "-"))
        rows.append(
            (
                "SVD inject: cold (cache miss) / warm (hit)",
                f"{r['cold_cached_s']:.2f} / {r['warm_s']:.2f} s",
                f"{r['warm_speedup']:.1f}x",
                f">= {r['target_speedup']:.0f}x",
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
                f"app: continual 15x500, IMSE vs Source ({r['updates']} updates)",
                f"{r['total_s']:.1f} s",
                "-",
                "<= 120 s",
            )
        )
        rows.append(("app: one update's figures (median build, payload)", f"{r['figures_median_s'] * 1e3:.0f} ms, "
                     f"{r['last_payload_bytes'] / 1e3:.0f} KB", "-", "<= 200 KB"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"device: {results['device']} ({results['device_name']}), torch threads {results['threads']}"]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
