"""Peak memory of one adaptation step, IMSE against SAR."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from imse.core.methods import create
from imse.core.spectral import inject, spectral_layers
from imse.perf.timing import _vit, check


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

    from imse.runs.memory import resident_bytes

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
            "import json, sys; from imse.perf.memory import _peak_step_bytes; "
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
    result["checks"] = [
        check(
            f"params+buffers: injected / original ({model_name}; floor {result['floor_ratio']:.3f})",
            f"{injected_bytes / 2**20:.0f} / {original_bytes / 2**20:.0f} MiB",
            f"{result['ratio']:.3f}",
            f"<= {result['target']}",
            result["ratio"] <= result["target"],
        ),
        check(
            f"peak memory of a step: IMSE / SAR ({model_name}, b{batch})",
            f"{peaks['imse'] / 2**20:.0f} / {peaks['sar'] / 2**20:.0f} MiB",
            f"{result['step_peak_ratio']:.2f}",
            "reported",
            None,
        ),
    ]
    return result
