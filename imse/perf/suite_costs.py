"""What each piece of the suite will cost, counted before it runs: calls x seconds per call, builds x seconds per
build. The suite's plan prints these sums; its runner compares them with what the pieces took.

A call's seconds come from the model's shapes and three rates per kind of device (``RATES``):

    seconds = GEMM multiply-adds x ``gemm_s_per_mac`` + activation values x ``element_s``   (the work)
              block passes x ``block_pass_s``                                             (the least a pass takes)

summed on the CPU, the larger of the two on CUDA (kernels queue while Python runs ahead). Multiply-adds are
``step_floor``'s exact counts for an IMSE and a SAR step; activation values are tokens x width per block and pass
(LayerNorm, GELU, softmax, the optimiser: the work GEMMs do not count). Other calls are shares of SAR's step
(``SHARES``). The rates were fitted to steps measured at batch 64 (``assets/results/perf_methods_*.json``: SAR on
the built-in model and ViT-B/16; H200 2026-11-29, 2 CPU cores 2026-11-26) and, for the CPU's least pass, to steps of
the smoke stand-ins; tf32 and bf16 are counted at fp32's rates, an upper bound. The suite's JSON records estimate
and measurement side by side, so that a run on new hardware says how far off these are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from imse.core.spectral import find_vit
from imse.perf.floors import step_floor


@dataclass(frozen=True)
class Rates:
    gemm_s_per_mac: float
    element_s: float  # per activation value (tokens x width) of a block in one forward + backward pass
    block_pass_s: float  # the least one block's forward + backward takes (launches, Python)
    overlapped: bool  # CUDA: the work hides the launches (max); CPU: they add up
    corrupt_s_per_value: float  # corrupting one pixel value of a batch (the slower corruptions)
    load_s_per_image: float  # reading and resizing one JPEG (a hub backbone's Lab run)


RATES = {
    # SAR b64: ViT-S 90 ms, ViT-B 248 ms -> 31.5 TMAC/s, 0.44 ns a value; built-in 16.6 ms over 12 block passes
    "cuda": Rates(3.2e-14, 0.44e-9, 1.4e-3, True, 2e-9, 2e-3),
    # SAR b64: built-in 0.39 s, ViT-B 33.5 s -> 200 GMAC/s, 46 ns a value; smoke stand-ins' SAR step 2.8 ms a pass
    "cpu": Rates(5.0e-12, 46e-9, 2.8e-3, False, 60e-9, 4e-3),
}
# CPU work on either machine: a run's parts built beyond its SVDs (data, methods, meter: ~0.2 s for the smoke's
# runs on one core; a hub backbone's build is counted apart: timm initialises it before reading its file), a Lab
# update's pooled heatmaps (3 x 128 small means per spectral layer), and a fresh interpreter importing torch, timm
# and imse (``perf``'s CPU memory benchmark starts one per step)
RUN_SETUP_S = 0.3
SNAPSHOT_S_PER_LAYER = 4e-3
FRESH_INTERPRETER_S = 4.0
# A call as shares of SAR's step: (multiply-adds, activation values, block passes). IMSE's multiply-adds are its own
# count (``step_floor``); its statistics and spectral layers add elementwise work and launches (H200: built-in
# 38.9 / 16.6 ms, ViT-B/16 333 / 248 ms). Source is one forward; TENT one pass; ViDA's teacher forwards its
# augmented copies (H200 built-in / ViT-B: 6.8 / 5.7 x SAR). "forward": an inference forward.
SHARES = {
    "source": (0.25, 0.15, 0.25),
    "forward": (0.25, 0.15, 0.25),
    "tent": (0.5, 0.5, 0.55),
    "sar": (1.0, 1.0, 1.0),
    "imse": (None, 1.4, 2.35),
    "dpal": (1.1, 1.1, 1.8),
    "vida": (6.0, 6.0, 6.8),
}
# Building on the CPU (the same on a GPU machine, whose CPU does it): timm's initialisation per parameter, the
# SVD cache's hashing and reading per byte of the decomposed weights, a cold float64 SVD per flop (ViT-B/16: 435
# GFLOP in 14.2 s on 2 cores)
INIT_S_PER_PARAM = 20e-9
CACHED_INJECT_S_PER_BYTE = 3e-9
SVD_S_PER_FLOP = 1 / 30e9


@dataclass(frozen=True)
class Shape:
    blocks: int
    width: int
    tokens: int  # per image
    side: int
    params: int
    layer_shapes: tuple[tuple[int, int], ...]  # (out, in) of every decomposed layer


@functools.cache
def model_shape(name: str) -> Shape:
    """The shapes a cost needs, from the model on the meta device (the built-in one from its config)."""
    from imse.perf.timing import meta_vit

    if name == "builtin":
        from imse.data.models import build_builtin_vit, builtin_config

        with torch.device("meta"):
            model = build_builtin_vit(builtin_config())
    else:
        model = meta_vit(name)
    _, vit = find_vit(model)
    linear = [m for block in vit.blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return Shape(
        blocks=len(vit.blocks),
        width=vit.embed_dim,
        tokens=vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1),
        side=vit.patch_embed.img_size[0],
        params=sum(p.numel() for p in model.parameters()),
        layer_shapes=tuple((m.out_features, m.in_features) for m in linear),
    )


@functools.cache
def _floor(name: str, batch: int) -> dict:
    from imse.perf.timing import meta_vit

    if name == "builtin":
        from imse.data.models import build_builtin_vit, builtin_config

        with torch.device("meta"):
            return step_floor(build_builtin_vit(builtin_config()), batch)
    return step_floor(meta_vit(name), batch)


class Costs:
    """Seconds per call and per build on one kind of device (``RATES``)."""

    def __init__(self, device: torch.device) -> None:
        self.rates = RATES["cuda" if device.type == "cuda" else "cpu"]

    def call(self, model: str, method: str, batch: int) -> float:
        """One call of ``method`` (a ``SHARES`` key; ``rebuild_step`` / ``rebuild_forward``: the official layer's
        IMSE step / inference, which rebuild ``U diag(S) Vh`` per layer and pass) on ``model`` at ``batch``."""
        shape, floor = model_shape(model), _floor(model, batch)
        rebuild = sum(out * inp * min(out, inp) for out, inp in shape.layer_shapes)
        if method.startswith("rebuild_"):
            base = self.call(model, "imse" if method == "rebuild_step" else "forward", batch)
            return base + rebuild * (6 if method == "rebuild_step" else 1) * self.rates.gemm_s_per_mac
        macs_share, element_share, pass_share = SHARES.get(method, SHARES["sar"])  # one registered later: as SAR
        macs = floor["imse_macs"] if macs_share is None else macs_share * floor["sar_macs"]
        passes = 2 * shape.blocks  # SAR: two SAM passes through every block
        values = passes * batch * shape.tokens * shape.width
        work = macs * self.rates.gemm_s_per_mac + element_share * values * self.rates.element_s
        least = pass_share * passes * self.rates.block_pass_s
        return max(work, least) if self.rates.overlapped else work + least

    def corrupt(self, batch: int, side: int) -> float:
        return batch * 3 * side * side * self.rates.corrupt_s_per_value

    def load_images(self, count: int) -> float:
        return count * self.rates.load_s_per_image

    @staticmethod
    def lab_overhead(model: str, compute_s: float, runs: int = 2) -> float:
        """Building ``runs`` Lab runs and their panel updates (one a second of compute, and the last)."""
        updates = runs + int(compute_s)
        return runs * RUN_SETUP_S + updates * SNAPSHOT_S_PER_LAYER * len(model_shape(model).layer_shapes)

    @staticmethod
    def prototype(model: str) -> float:
        """timm's random initialisation of ``model`` (once per model: ``perf.timing`` keeps a copy)."""
        return model_shape(model).params * INIT_S_PER_PARAM

    @staticmethod
    def inject(model: str, cold: bool) -> float:
        """Decomposing every target layer: from the SVD cache, or (``cold``) float64 SVDs written to it."""
        shapes = model_shape(model).layer_shapes
        cached = sum(4 * out * inp for out, inp in shapes) * CACHED_INJECT_S_PER_BYTE
        if not cold:
            return cached
        flops = sum(4 * out * inp * min(out, inp) + 8 * min(out, inp) ** 3 for out, inp in shapes)
        return cached + flops * SVD_S_PER_FLOP
