"""Speed benchmarks behind ``python -m imse perf``: ratios measured in one run against a baseline in the same run.

Machines here are shared and noisy, so every figure is a median over repeats, the two sides of a ratio are
timed interleaved (A, B, A, B, ...), and only ratios are compared with targets.
"""

from __future__ import annotations

import copy
import dataclasses
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
from .spectral import SpectralLinear, find_vit, get_code, inject, merge, set_code, spectral_layers

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
        "target": 1.02,
    }


def _imse_layer_macs(out: int, inp: int, tokens: int, trained: bool, input_grad: bool) -> int:
    """Least GEMM multiply-adds of one IMSE layer in one SAM pass (forward + backward), rank ``r = min(in, out)``.

    Trained layers need ``∂L/∂S_i = Σ_n (x_n·v_i)(g_n·u_i)``. Factored: forward ``x Vhᵀ`` (T·in·r) then
    ``(· ⊙ S) Uᵀ`` (T·r·out); backward ``g U`` (T·out·r, which gives ∂S elementwise) and the input gradient
    ``(g U ⊙ S) Vh`` (T·r·in): ``2·T·r·(in + out)``. Dense: forward, input gradient and the weight gradient
    ``gᵀ x`` (3·T·in·out), plus rebuilding ``U diag(S) Vh`` and reading ``∂S`` off the weight gradient
    (2·out·r·in). The cheaper wins (dense for the square ``proj`` layers at batch 64, factored for the rest),
    as ``SpectralLinear`` chooses.
    Frozen-S layers of the last blocks still need ``x Vhᵀ`` (the diversity term), which makes factored least.
    """
    r = min(out, inp)
    factored = 2 * tokens * r * (inp + out) - (0 if input_grad else tokens * r * inp)
    if not trained:
        return factored
    dense = 3 * tokens * out * inp + 2 * out * r * inp - (0 if input_grad else tokens * out * inp)
    return min(factored, dense)


def step_floor(model: torch.nn.Module, batch: int, frozen_blocks: int = 3) -> dict:
    """GEMM multiply-adds of one SAR and one IMSE step (two SAM passes each) on ``model`` at ``batch``: the floor
    of the IMSE/SAR cost ratio. Elementwise work (softmax, norms, GELU, the std statistics) is not counted.

    Per SAM pass, with T tokens per image (``batch`` images) and attention ``2 T² d`` forward / ``4 T² d``
    backward per block, both methods:
    - SAR (LayerNorms of blocks ``0 .. depth-1-frozen``): forward ``T·in·out``; backward only the input gradient
      ``T·in·out`` (no weight gradients), from the head down to block 0 (its first LayerNorm trains).
    - IMSE (S of the same blocks; the last ``frozen`` blocks' ``x Vhᵀ`` feed the diversity term): per layer the
      least of the factored and dense routes, ``_imse_layer_macs``. Block 0's first layer needs no input
      gradient (nothing before it trains).
    """
    _, vit = find_vit(model)
    per_image = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)
    tokens = per_image * batch  # every token row of the batch goes through each linear layer
    patch = vit.patch_embed.proj
    patch_macs = vit.patch_embed.num_patches * batch * patch.weight[0].numel() * patch.out_channels
    head = batch * vit.head.in_features * vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0
    attention = 6 * per_image**2 * vit.embed_dim * batch  # 2 T² d forward + 4 T² d backward per image
    sar = imse = 2 * (patch_macs + 2 * head)  # forward + input gradient of the head, both methods, per pass
    depth = len(vit.blocks)
    for index, block in enumerate(vit.blocks):
        layers = (torch.nn.Linear, SpectralLinear)
        shapes = [(m.out_features, m.in_features) for m in block.modules() if isinstance(m, layers)]
        trained = index < depth - frozen_blocks
        sar_pass = sum(2 * tokens * o * i for o, i in shapes) + attention
        imse_pass = attention + sum(
            _imse_layer_macs(o, i, tokens, trained, input_grad=(index, n) != (0, 0)) for n, (o, i) in enumerate(shapes)
        )
        sar += 2 * sar_pass
        imse += 2 * imse_pass
    return {"sar_macs": sar, "imse_macs": imse, "ratio": imse / sar, "tokens": per_image}


def bench_step(device: torch.device, batch: int, repeats: int, model_name: str) -> dict:
    """One IMSE adaptation step vs one SAR step (both two SAM passes) on the same batch, with the GEMM floor.

    A random-init model predicts near-uniformly, so no sample would pass ``H < 0.4 ln C`` and both methods
    would skip their updates; ``margin=1.0`` (``E0 = ln C``) keeps every sample so both do full updates.
    """
    imse = create("imse", _vit(model_name, device), margin=1.0)
    sar = create("sar", _vit(model_name, device), margin=1.0, batch_size=batch)
    floor = step_floor(sar.model, batch)
    x = torch.randn(batch, 3, 224, 224, device=device)
    t = _time_interleaved({"sar": lambda: sar(x), "imse": lambda: imse(x)}, repeats, 1, device)
    return {
        "model": model_name,
        "batch": batch,
        "sar_step_s": t["sar"],
        "imse_step_s": t["imse"],
        "ratio": t["imse"] / t["sar"],
        "floor_ratio": floor["ratio"],
        "floor": floor,
        "target": 1.1 * floor["ratio"],
        "sar_gmacs_per_s": floor["sar_macs"] / t["sar"] / 1e9,
        "imse_gmacs_per_s": floor["imse_macs"] / t["imse"] / 1e9,
        "both_updated": bool(imse.last_record["updated"] and sar.last_record["updated"]),
        "imse_trainable": imse.num_trainable(),
        "sar_trainable": sar.num_trainable(),
    }


def bench_precision(device: torch.device, batch: int, repeats: int, model_name: str, per_domain: int) -> dict:
    """bfloat16 autocast: what it buys and what it costs.

    Speed: IMSE and SAR steps on ``model_name`` at ``batch`` under bf16 autocast, timed interleaved with the
    float32 IMSE step (images/s, the bf16 IMSE/SAR ratio against the same GEMM floor, the bf16 speedup).
    Accuracy: ``python -m imse bench``'s built-in continual stream (15 test corruptions x ``per_domain``,
    severity 5, seed 0) through IMSE in float32 and in bf16, on the same corrupted batches.
    """
    from .bench import run_bench

    steps = {
        "imse_bf16": create("imse", _vit(model_name, device), margin=1.0, precision="bf16"),
        "sar_bf16": create("sar", _vit(model_name, device), margin=1.0, batch_size=batch, precision="bf16"),
        "imse_fp32": create("imse", _vit(model_name, device), margin=1.0),
    }
    floor = step_floor(steps["sar_bf16"].model, batch)
    x = torch.randn(batch, 3, 224, 224, device=device)
    t = _time_interleaved({name: lambda m=method, x=x: m(x) for name, method in steps.items()}, repeats, 1, device)
    updated = all(method.last_record["updated"] for method in steps.values())
    del steps, x  # free the three ViTs before the accuracy runs
    accuracy = run_bench(
        methods=("imse", "imse@precision=bf16"), per_domain=per_domain, device=str(device), progress=False
    )["methods"]
    fp32, bf16 = accuracy["imse"]["mean_accuracy"], accuracy["imse@precision=bf16"]["mean_accuracy"]
    return {
        "model": model_name,
        "batch": batch,
        "imse_bf16_step_s": t["imse_bf16"],
        "sar_bf16_step_s": t["sar_bf16"],
        "imse_fp32_step_s": t["imse_fp32"],
        "imse_bf16_images_per_s": batch / t["imse_bf16"],
        "ratio": t["imse_bf16"] / t["sar_bf16"],
        "floor_ratio": floor["ratio"],
        "bf16_speedup": t["imse_fp32"] / t["imse_bf16"],
        "all_updated": updated,
        "accuracy": {
            "stream": f"built-in continual, 15 x {per_domain} images, severity 5, seed 0",
            "images": sum(domain["n"] for domain in accuracy["imse"]["domains"]),
            "fp32_mean": fp32,
            "bf16_mean": bf16,
            "difference_points": 100 * (bf16 - fp32),
            "target_points": 0.3,
        },
    }


class RebuildEveryForward(SpectralLinear):
    """The official implementation's layer, the small-batch baseline: ``U diag(S) Vh`` rebuilt on every call
    (autograd then needs the weight-gradient GEMM and the rebuild's backward), and the alignment statistics'
    projection ``x Vhᵀ`` computed by a GEMM of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection_hook is not None:
            self.projection_hook(x, torch.nn.functional.linear(x, self.Vh))
        return torch.nn.functional.linear(x, self.weight(), self.bias)


def _as_rebuild_every_forward(model: torch.nn.Module) -> torch.nn.Module:
    for layer in spectral_layers(model).values():
        layer.__class__ = RebuildEveryForward
    return model


def bench_small_batch(device: torch.device, repeats: int, model_name: str, batch: int) -> dict:
    """Ours (per-call choice of merged weight / factored path) vs rebuilding ``U diag(S) Vh`` on every forward:
    one IMSE step, and inference with an adapted (unmerged) code, at ``batch``; speedup = reference / ours."""
    from .svd_cache import default_svd_cache

    plain = _vit(model_name, device)
    inject(plain, cache=default_svd_cache())
    set_code(plain, {name: s * (1 + 0.01 * torch.randn_like(s)) for name, s in get_code(plain).items()})
    ours = create("imse", copy.deepcopy(plain), margin=1.0)
    reference = create("imse", _as_rebuild_every_forward(copy.deepcopy(plain)), margin=1.0)
    x = torch.randn(batch, 3, 224, 224, device=device)
    step = _time_interleaved({"ours": lambda: ours(x), "reference": lambda: reference(x)}, repeats, 1, device)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)

        return run

    inference = _time_interleaved({"ours": infer(ours.model), "reference": infer(reference.model)}, repeats, 2, device)
    return {
        "model": model_name,
        "batch": batch,
        "step_ours_s": step["ours"],
        "step_reference_s": step["reference"],
        "step_speedup": step["reference"] / step["ours"],
        "inference_ours_s": inference["ours"],
        "inference_reference_s": inference["reference"],
        "inference_speedup": inference["reference"] / inference["ours"],
        "target": ">= 3 at batch 1, >= 1 at batch 64",
    }


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_step_bytes(method: str, model_name: str, batch: int, device: str) -> int:
    """Peak memory one adaptation step adds on top of the set-up method (CUDA: allocator peak; CPU: the
    process's peak resident set, reset through /proc/self/clear_refs, run in a fresh process by the caller)."""
    dev = torch.device(device)
    overrides = {"batch_size": batch} if method == "sar" else {}
    adapter = create(method, _vit(model_name, dev), margin=1.0, **overrides)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    adapter(x)  # warm: optimiser state exists, as in a stream
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        adapter(x)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    import gc

    from .serving import resident_bytes

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = resident_bytes()
    adapter(x)
    return resident_bytes(field="VmHWM") - before


def bench_memory(device: torch.device, batch: int, model_name: str = "vit_base_patch16_224") -> dict:
    """Parameter+buffer bytes of the injected model vs the original (and the floor: U and Vh alone), and the
    peak memory of one IMSE step vs one SAR step (each in a fresh process so neither inherits the other's)."""
    import subprocess
    import sys

    original = _vit(model_name, device)
    injected = copy.deepcopy(original)
    inject(injected)
    linear = [m for m in original.modules() if isinstance(m, torch.nn.Linear) and m is not original.head]
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linear)
    factor_bytes = sum(
        (layer.U.numel() + layer.Vh.numel()) * layer.U.element_size() for layer in spectral_layers(injected).values()
    )
    original_bytes, injected_bytes = _tensor_bytes(original), _tensor_bytes(injected)
    result = {
        "model": model_name,
        "original_bytes": original_bytes,
        "injected_bytes": injected_bytes,
        "ratio": injected_bytes / original_bytes,
        "u_vh_over_linear_weights": factor_bytes / linear_bytes,
        "floor_ratio": (original_bytes - linear_bytes + factor_bytes) / original_bytes,
        "target": 1.36,
    }
    peaks = {}
    for method in ("sar", "imse"):
        code = (
            "import json, sys; from imse.perf import _peak_step_bytes; "
            f"print(json.dumps(_peak_step_bytes({method!r}, {model_name!r}, {batch}, {str(device)!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        peaks[method] = int(done.stdout.strip().splitlines()[-1])
    result.update(
        step_batch=batch,
        sar_step_peak_bytes=peaks["sar"],
        imse_step_peak_bytes=peaks["imse"],
        step_peak_ratio=peaks["imse"] / peaks["sar"],
    )
    return result


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


def bench_stream(device: torch.device, repeats: int, batch: int = 64, severity: int = 5) -> dict:
    """Corrupting a batch vs the IMSE step that consumes it, per corruption, on the same device: the built-in
    backbone at 32 px on the CPU, ViT-B/16 (random init; timing only) at 224 px on a GPU."""
    from .data.corruptions import CORRUPTIONS, corrupt
    from .models import create_backbone

    if device.type == "cpu":
        backbone, size, label = create_backbone("builtin", device=device), 32, "builtin"
    else:
        backbone, size, label = _vit("vit_base_patch16_224", device), 224, "vit_base_patch16_224"
    imse = create("imse", backbone, margin=1.0)
    images = _benchmark_images(batch, size).to(device)
    x = images.float() / 255
    step = _time_interleaved({"step": lambda: imse(x)}, repeats, 2, device)["step"]
    rows = {}
    for name in CORRUPTIONS:
        generator = torch.Generator(device).manual_seed(0)
        seconds = _time_interleaved(
            {name: lambda name=name, g=generator: corrupt(images, name, severity, generator=g)}, repeats, 1, device
        )[name]
        rows[name] = {"corrupt_s": seconds, "share_of_step": seconds / step}
    worst = max(rows, key=lambda n: rows[n]["share_of_step"])
    return {
        "model": label,
        "size": size,
        "batch": batch,
        "severity": severity,
        "imse_step_s": step,
        "per_corruption": rows,
        "worst": worst,
        "worst_share": rows[worst]["share_of_step"],
        "target": 0.10,
    }


def bench_startup(timeout: float = 120.0) -> dict:
    """Built-in app cold start: ``python app.py`` process start to the page ready in a browser (the Start
    button visible; Debian's chromium through Playwright), or to the first HTTP 200 without a browser."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import urllib.request

    app = Path(__file__).resolve().parents[1] / "app.py"
    if not app.exists():
        return {"skipped": f"no app.py next to the package ({app})"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    chromium = shutil.which("chromium")
    browser = playwright = None
    if chromium:
        try:
            from playwright.sync_api import sync_playwright

            playwright = sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        except ImportError:
            pass
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(app)], cwd=app.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    result: dict[str, Any] = {}
    try:
        while "server_ready_s" not in result:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with status {process.returncode} while starting")
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"app.py did not answer within {timeout:.0f} s")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        result["server_ready_s"] = time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
        if browser is not None:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("button", name="Start").wait_for(state="visible", timeout=timeout * 1000)
            result["page_ready_s"] = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=10)
        if browser is not None:
            browser.close()
        if playwright is not None:
            playwright.stop()
    return result


def bench_lab(device: torch.device) -> dict:
    """What the app's Start does on the built-in backbone: time to the first panel update (warm: a first tiny
    run loads everything) and the whole default run (``LabConfig()``: the Lab's defaults), figures included."""
    from . import viz
    from .lab import LabConfig, run_lab

    warm = LabConfig(corruptions=("fog",), per_domain=64, device=str(device))
    for _ in run_lab(warm):
        pass
    config = LabConfig(device=str(device))
    started = time.perf_counter()
    first = None
    updates = 0
    figure_seconds = []
    for state in run_lab(config):  # at the app's update interval
        built = time.perf_counter()
        figures = [viz.accuracy_figure(state), viz.collapse_figure(state), viz.alignment_figure(state)]
        figures += [viz.shift_figure(state), viz.bank_figure(state), viz.batch_figure(state)]
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
        "config": dataclasses.asdict(config),
        "targets": {"first_update_s": 5.0, "total_s": 120.0, "payload_bytes": 200_000},
    }


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
