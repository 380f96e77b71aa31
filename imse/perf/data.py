"""The data side: SVD start-up with the disk cache, the corruption engine, a whole stream's batches."""

from __future__ import annotations

import statistics
import time

import torch

from imse.core.images import as_float_images
from imse.core.methods import create
from imse.core.spectral import inject
from imse.perf.timing import _sync, _time_interleaved, _vit, check


def bench_svd(device: torch.device, repeats: int, model_name: str) -> dict:
    """One-time cost of decomposing every target layer (float64 SVD), what a user waits for at start-up: cold
    (no cache: SVD, hashing and writing the cache) and warm (the factors read back from the disk cache)."""
    import tempfile

    from imse.core.svd_cache import SVDCache

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
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    speedup, target = cold_s / warm_s, 10.0
    return {
        "model": model_name,
        "layers": len(names),
        "inject_s": plain,
        "cold_cached_s": cold_s,
        "warm_s": warm_s,
        "warm_speedup": speedup,
        "target_speedup": target,
        "repeats": repeats,
        "checks": [
            check(f"SVD inject ({model_name}, {len(names)} layers), no cache", f"{plain:.2f} s", "-", "reported", None),
            check(
                "SVD inject: cold (cache miss) / warm (hit)",
                f"{cold_s:.2f} / {warm_s:.2f} s",
                f"{speedup:.1f}x",
                f">= {target:.0f}x",
                speedup >= target,
            ),
        ],
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
    from imse.data.corruptions import CORRUPTIONS, corrupt

    images = _benchmark_images(batch, size)
    on_device = images.to(device)
    try:
        import corrupt_tta
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
            row["reference_s"] = _reference_seconds(corrupt_tta, images, name, severity=severity, repeats=repeats)
            row["speedup"] = row["reference_s"] / row["ours_s"]
        rows[name] = row
    result = {"batch": batch, "size": size, "severity": severity, "device": str(device), "per_corruption": rows}
    result.update(_speedups(rows))
    result["checks"] = _corruption_checks(result)
    return result


def _reference_seconds(corrupt_tta, images: torch.Tensor, name: str, *, severity: int, repeats: int) -> float:
    """Median seconds of corrupt-tta on every image of the batch, one by one on the CPU; fewer repeats past a 20 s
    budget (glass blur's reference takes ~10 s per batch)."""
    import numpy as np

    arrays = [image.permute(1, 2, 0).numpy() for image in images]
    samples = []
    budget = time.perf_counter() + 20.0
    for _ in range(repeats):
        start = time.perf_counter()
        for array in arrays:
            np.uint8(np.clip(corrupt_tta.corrupt(array, severity=severity, corruption_name=name), 0, 255))
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > budget:
            break
    return statistics.median(samples)


def _speedups(rows: dict[str, dict]) -> dict:
    """The median and slowest speedup over the corruptions, with their target; nothing without the reference."""
    speedups = [row["speedup"] for row in rows.values() if "speedup" in row]
    if not speedups:
        return {}
    return {"median_speedup": statistics.median(speedups), "slowest_speedup": min(speedups),
            "target": "median >= 5, none < 1"}  # fmt: skip


def _corruption_checks(result: dict) -> list:
    """One reported row per corruption, then the median and slowest speedups against their targets, or a note
    when the reference is not installed."""
    batch, size, severity, rows = result["batch"], result["size"], result["severity"], result["per_corruption"]
    checks = []
    for name, row in rows.items():
        reference = (
            f" / {row['reference_s'] * 1e3:.0f} ms (corrupt-tta, per image, CPU)" if "reference_s" in row else ""
        )
        speedup = f"{row['speedup']:.1f}x" if "speedup" in row else "-"
        checks.append(
            check(f"corrupt {name} ({batch}x{size}px, s{severity})", f"{row['ours_s'] * 1e3:.0f} ms{reference}",
                  speedup, "reported", None)
        )  # fmt: skip
    if "median_speedup" not in result:
        return [*checks, check("corruptions vs reference", "pip install corrupt-tta to compare", "-", "-", None)]
    checks.append(
        check(
            "corruptions: median / slowest speedup vs reference",
            "",
            f"{result['median_speedup']:.1f}x / {result['slowest_speedup']:.1f}x",
            ">= 5x / >= 1x",
            result["median_speedup"] >= 5 and result["slowest_speedup"] >= 1,
        )
    )
    return checks


def bench_stream(device: torch.device, repeats: int, batch: int = 64, severity: int = 5) -> dict:
    """Corrupting a batch vs the IMSE step that consumes it, per corruption, on the same device: the built-in
    backbone at 32 px on the CPU, ViT-B/16 (random init; timing only) at 224 px on a GPU."""
    from imse.data.corruptions import CORRUPTIONS, corrupt
    from imse.data.models import create_backbone

    if device.type == "cpu":
        backbone, size, label = create_backbone("builtin", device=device), 32, "builtin"
    else:
        backbone, size, label = _vit("vit_base_patch16_224", device), 224, "vit_base_patch16_224"
    imse = create("imse", backbone, margin=1.0)
    images = _benchmark_images(batch, size).to(device)
    x = as_float_images(images)
    step = _time_interleaved({"step": lambda: imse(x)}, repeats, 2, device)["step"]
    rows = {}
    for name in CORRUPTIONS:
        generator = torch.Generator(device).manual_seed(0)
        seconds = _time_interleaved(
            {name: lambda name=name, g=generator: corrupt(images, name, severity, generator=g)}, repeats, 1, device
        )[name]
        rows[name] = {"corrupt_s": seconds, "share_of_step": seconds / step}
    worst = max(rows, key=lambda n: rows[n]["share_of_step"])
    share, target = rows[worst]["share_of_step"], 0.10
    return {
        "model": label,
        "size": size,
        "batch": batch,
        "severity": severity,
        "imse_step_s": step,
        "per_corruption": rows,
        "worst": worst,
        "worst_share": share,
        "target": target,
        "checks": [
            check(
                f"corrupt a batch / IMSE step ({label}, b{batch}, {size} px, worst: {worst})",
                f"{rows[worst]['corrupt_s'] * 1e3:.1f} / {step * 1e3:.0f} ms",
                f"{share:.3f}",
                f"<= {target}",
                share <= target,
            )
        ],
    }
