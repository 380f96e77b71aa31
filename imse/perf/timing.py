"""Timing that survives a noisy shared machine (synchronised devices, interleaved repeats, medians), the models the
benchmarks time (random-init timm ViTs, and scaled-down stand-ins for a CPU smoke run), and the row every benchmark
result carries: what it measured, against which target, and whether it met it."""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable, Iterator
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


# Stand-ins for ViT-S/16 and ViT-B/16 in the suite's CPU smoke run (``perf --device cpu --smoke``): the same timm
# architectures at 32 px (4 patches) and 4 blocks (the last 3 frozen, as IMSE's diversity term needs), narrower,
# so that two cores walk every code path of the suite in seconds. Timing them measures nothing worth reporting.
SMOKE_VITS = {
    "smoke_vit_s": ("vit_small_patch16_224", {"img_size": 32, "depth": 4, "embed_dim": 48, "num_heads": 2}),
    "smoke_vit_b": ("vit_base_patch16_224", {"img_size": 32, "depth": 4, "embed_dim": 64, "num_heads": 2}),
}


def vit_architecture(name: str) -> tuple[str, dict]:
    """The timm architecture and its options behind a benchmark's model name (a timm name, or a smoke stand-in)."""
    return SMOKE_VITS.get(name, (name, {}))


@functools.lru_cache(maxsize=4)
def _prototype(name: str, seed: int) -> torch.nn.Module:
    """One random-init model per name and seed, built once on the CPU (timm's initialisation of ViT-B/16 takes
    seconds; a copy, milliseconds)."""
    import timm

    architecture, options = vit_architecture(name)
    torch.manual_seed(seed)
    return timm.create_model(architecture, pretrained=False, **options).eval()


def _vit(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A fresh random-init ViT (the same weights for the same name and seed, as if built anew) on ``device``."""
    return copy.deepcopy(_prototype(name, seed)).to(device).eval()


def meta_vit(name: str) -> torch.nn.Module:
    """The model's shapes without its weights (the meta device): what a cost estimate reads, in milliseconds."""
    import timm

    architecture, options = vit_architecture(name)
    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, **options)


def images_for(model: torch.nn.Module, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A batch of random images at the ViT's own input size (224 px for ViT-S/B, 32 for the smoke stand-ins)."""
    from imse.core.spectral import find_vit

    _, vit = find_vit(model)
    height, width = vit.patch_embed.img_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator).to(device)


@contextlib.contextmanager
def inference_precision(precision: str, device: torch.device) -> Iterator[None]:
    """What an inference forward runs under in ``precision``, as a method's forwards do (``TTAMethod.run_model``,
    ``precision_scope``): bf16 autocast, TF32 matmuls on CUDA, or nothing for fp32."""
    from imse.core.methods.base import precision_scope

    with precision_scope(precision, device), torch.inference_mode():
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


def check(measure: str, median: str, ratio: str, target: str, met: bool | None) -> dict:
    """One row of the perf table, stored in the benchmark's own result (``result["checks"]``) so that the JSON
    says what each number was held to; ``met`` is None for a number that is reported, not held to a target."""
    return {"measure": measure, "median": median, "ratio": ratio, "target": target, "met": met}
