"""Peak memory of one adaptation step, IMSE against SAR."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from imse.core.methods import create
from imse.core.spectral import inject, spectral_layers
from imse.perf.timing import _vit, check, images_for


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_step_bytes(method: str, model_name: str, batch: int, device: str, precision: str = "fp32") -> int:
    """Peak memory one adaptation step adds on top of the set-up method (CUDA: the allocator's peak, exact in any
    process; CPU: the process's peak resident set, reset through /proc/self/clear_refs, which only a fresh process
    measures alone: ``bench_memory`` runs it in one)."""
    dev = torch.device(device)
    overrides = {"batch_size": batch} if method == "sar" else {}
    adapter = create(method, _vit(model_name, dev), margin=1.0, precision=precision, **overrides)
    x = images_for(adapter.model, batch, dev)
    adapter(x)  # warm: optimiser state exists, as in a stream
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        adapter(x)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    import gc

    from imse.runs.memory import resident_bytes

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = resident_bytes()
    adapter(x)
    return resident_bytes(field="VmHWM") - before


def bench_memory(
    device: torch.device,
    batch: int,
    model_name: str = "vit_base_patch16_224",
    precision: str = "fp32",
    fresh_process: bool | None = None,
) -> dict:
    """Parameter+buffer bytes of the injected model vs the original (and the floor: U and Vh alone), and the
    peak memory of one IMSE step vs one SAR step in ``precision``. On the CPU each step runs in a fresh process
    (the resident set's peak would carry the other's); CUDA's allocator counts its peak in this process
    (``fresh_process`` overrides either)."""
    from imse.core.svd_cache import default_svd_cache

    original = _vit(model_name, device)
    injected = copy.deepcopy(original)
    inject(injected, cache=default_svd_cache())
    linear_bytes, factor_bytes = _linear_and_factor_bytes(original, injected)
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
    fresh_process = device.type != "cuda" if fresh_process is None else fresh_process
    step = {"model_name": model_name, "batch": batch, "device": str(device), "precision": precision}
    peaks = {method: _peak(method, fresh_process=fresh_process, **step) for method in ("sar", "imse")}
    result.update(
        precision=precision,
        measured_in="a fresh process per step" if fresh_process else "this process",
        step_batch=batch,
        sar_step_peak_bytes=peaks["sar"],
        imse_step_peak_bytes=peaks["imse"],
        # None when SAR's step added nothing measurable (a process's resident peak, when an earlier step's freed
        # memory served it)
        step_peak_ratio=peaks["imse"] / peaks["sar"] if peaks["sar"] > 0 else None,
    )
    result["checks"] = [
        check(
            f"params+buffers: injected / original ({model_name}; floor {result['floor_ratio']:.3f})",
            f"{injected_bytes / 2**20:.0f} / {original_bytes / 2**20:.0f} MiB",
            f"{result['ratio']:.3f}",
            f"<= {result['target']}",
            result["ratio"] <= result["target"],
        ),
        check(
            f"peak memory of a step: IMSE / SAR ({model_name}, b{batch}, {precision}; {result['measured_in']})",
            f"{peaks['imse'] / 2**20:.0f} / {peaks['sar'] / 2**20:.0f} MiB",
            "-" if result["step_peak_ratio"] is None else f"{result['step_peak_ratio']:.2f}",
            "reported",
            None,
        ),
    ]
    return result


def _linear_and_factor_bytes(original: torch.nn.Module, injected: torch.nn.Module) -> tuple[int, int]:
    """The bytes of the linear weights (the head aside) and of the spectral factors U and Vh replacing them."""
    linear = [m for m in original.modules() if isinstance(m, torch.nn.Linear) and m is not original.head]
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linear)
    layers = spectral_layers(injected).values()
    return linear_bytes, sum((layer.U.numel() + layer.Vh.numel()) * layer.U.element_size() for layer in layers)


def _peak(method: str, *, model_name: str, batch: int, device: str, precision: str, fresh_process: bool) -> int:
    """``_peak_step_bytes`` in this process or in a fresh interpreter."""
    if not fresh_process:
        return _peak_step_bytes(method, model_name, batch, device, precision)
    import subprocess
    import sys

    arguments = f"{method!r}, {model_name!r}, {batch}, {device!r}, {precision!r}"
    code = f"from imse.perf.memory import _peak_step_bytes; print(_peak_step_bytes({arguments}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])
