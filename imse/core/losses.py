"""Losses of entropy-based TTA and IMSE's expert-alignment statistics (the paper's formulas; docs/teach.md draws them).

Everything here is a pure function of tensors, except ``AlignmentProbe``, which collects the alignment
statistics of spectral layers during a forward pass through hooks (so the layers themselves stay plain).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from imse.core.spectral import SpectralLinear

__all__ = [
    "AlignmentProbe",
    "alignment_std",
    "diversity_loss",
    "entropy_margin",
    "layer_diversity",
    "masked_mean",
    "projected_alignment_std",
    "reliable_mask",
    "softmax_entropy",
]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy ``H = -Σ p log p`` of the softmax over the last dimension, one value per row; float32 whatever the
    logits' dtype or autocast (a float32 tensor's ``.float()`` is itself: fp32 results stay bit for bit)."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """SAR/EATA's reliability margin ``E0 = factor · ln C``."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    return factor * math.log(num_classes)


def reliable_mask(entropy: torch.Tensor, num_classes: int, factor: float = 0.4) -> torch.Tensor:
    """Boolean mask of the samples confident enough to learn from: ``H < E0``."""
    return entropy < entropy_margin(num_classes, factor)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """Mean of ``values[mask]``, or ``None`` when the mask is empty (so an empty filter never yields NaN); reduced
    in float32 (bfloat16 values under ``precision="bf16"`` are cast first)."""
    if not bool(mask.any()):
        return None
    return values[mask].float().mean()


def alignment_std(x: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """Per-expert spread of how the inputs align with the right singular vectors.

    ``a_{n,i} = v_iᵀ x_n / ‖x_n‖`` for every row ``x_n`` (all leading dims of ``x`` pooled: images × tokens);
    returns the unbiased std over rows, shape ``[r]``, in float32 at least (``projected_alignment_std``). With a
    single row there is no spread: zeros.
    """
    return projected_alignment_std(x, F.linear(x, Vh.to(x.dtype)))


class _AlignmentStd(torch.autograd.Function):
    """Unbiased std over rows of ``a_{n,i} = p_{n,i} / max(‖x_n‖, eps)``, with a backward written out.

    Same values and gradients as autograd through ``(p / x.norm(dim=-1, keepdim=True).clamp_min(eps)).std(0)``
    (a zero std passes no gradient, as in torch's own std), in fewer passes over the ``N × r`` and ``N × in``
    arrays: for IMSE's diversity layers autograd's chain (norm, divide, Welford std and their backwards) cost
    more than the GEMMs it rides on. Backward: ``∂σ_i/∂a_{n,i} = c_{n,i} / ((N−1) σ_i)`` with ``c`` the
    centred alignments (the mean's share sums to zero), then through ``a = p · w`` and ``w = 1/‖x‖``
    (``∂w_n/∂x_n = −x_n w_n³``, zero where clamped).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, projection: torch.Tensor, eps: float) -> torch.Tensor:
        norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        inverse = norms.clamp_min(eps).reciprocal()
        centered = projection * inverse
        centered -= centered.mean(dim=0)
        # (a column vector_norm or torch.std reduce across rows ~12x slower on CPU than square-then-sum)
        std = (centered.square().sum(dim=0) / (rows.shape[0] - 1)).sqrt()
        ctx.save_for_backward(rows, projection, inverse, norms > eps, centered, std)
        return std

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        rows, projection, inverse, unclamped, centered, std = ctx.saved_tensors
        scale = (grad / (std * (rows.shape[0] - 1))).masked_fill(std == 0, 0)
        grad_alignment = centered * scale
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_inverse = torch.linalg.vecdot(grad_alignment, projection, dim=-1).unsqueeze(-1)
            grad_rows = rows * (-grad_inverse * inverse.pow(3) * unclamped)
        grad_projection = grad_alignment.mul_(inverse) if ctx.needs_input_grad[1] else None
        return grad_rows, grad_projection, None


def projected_alignment_std(x: torch.Tensor, projection: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``alignment_std`` from an already computed ``projection = x Vhᵀ`` (what a factored spectral layer has):
    dividing each projected row by ``‖x_n‖`` equals projecting the normalised row."""
    # float32 at least: under bf16 autocast the projection is bfloat16, too coarse for a spread of cosines
    dtype = torch.promote_types(projection.dtype, torch.float32)
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    projection = projection.reshape(-1, projection.shape[-1]).to(dtype)
    if rows.shape[0] < 2:
        return projection.new_zeros(projection.shape[-1])
    return _AlignmentStd.apply(rows, projection, eps)


def layer_diversity(std: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """Mean of the ``k = min(⌊r·ratio⌋, r−1)`` smallest stds of one layer (at least one).

    With the official ``ratio = 1.0`` this is the mean over all experts but the single largest one. Reduced in
    float32 whatever ``std``'s dtype.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    rank = std.numel()
    k = max(1, min(int(rank * ratio), rank - 1))
    return torch.topk(std.float(), k, largest=False, sorted=False).values.mean()


def diversity_loss(stds: Iterable[torch.Tensor], num_blocks: int = 3, ratio: float = 1.0) -> torch.Tensor:
    """``L_dm = Σ_ℓ L_ℓ / num_blocks`` over the given layers (IMSE: 4 layers in each of the last 3 blocks).

    IMSE *maximises* it (the loss subtracts ``λ_dm · L_dm``) so that experts keep diverse responses.
    """
    terms = [layer_diversity(std, ratio) for std in stds]
    if not terms:
        raise ValueError("diversity_loss needs at least one layer's statistics")
    return torch.stack(terms).sum() / num_blocks


class AlignmentProbe:
    """Collects ``alignment_std`` of spectral layers during forward passes.

    ``differentiable`` layers (they feed the diversity loss) keep the graph and reuse the layer's own ``x Vhᵀ``
    GEMM through its ``projection_hook`` (which makes the layer take its factored path). ``detached`` layers
    (what the app's heatmap shows) are measured by a plain pre-forward hook instead, so observing a layer never
    changes how it computes. Hooks exist only inside ``capture()``.
    """

    def __init__(self, layers: Mapping[str, SpectralLinear]) -> None:
        self.layers = dict(layers)
        self.stats: dict[str, torch.Tensor] = {}
        self.capturing = False  # inside capture(): ``stats`` holds this capture's values as they are computed

    @contextmanager
    def capture(self, differentiable: Iterable[str] = (), detached: Iterable[str] = ()):
        differentiable = set(differentiable)
        detached = set(detached) - differentiable
        unknown = (differentiable | detached) - self.layers.keys()
        if unknown:
            raise KeyError(f"not spectral layers: {sorted(unknown)[:3]}")
        self.stats = {}
        for name in differentiable:
            if self.layers[name].projection_hook is not None:
                raise RuntimeError(f"{name} is already being captured")
        handles = []
        try:
            for name in differentiable:
                self.layers[name].projection_hook = self._projection_hook(name)
            for name in detached:
                handles.append(self.layers[name].register_forward_pre_hook(self._input_hook(name)))
            self.capturing = True
            yield self.stats
        finally:
            self.capturing = False
            for name in differentiable:
                self.layers[name].projection_hook = None
            for handle in handles:
                handle.remove()

    def _projection_hook(self, name: str):
        def hook(x: torch.Tensor, projection: torch.Tensor) -> None:
            self.stats[name] = projected_alignment_std(x, projection)

        return hook

    def _input_hook(self, name: str):
        def hook(module: SpectralLinear, args: tuple) -> None:
            with torch.no_grad():
                self.stats[name] = alignment_std(args[0].detach(), module.Vh)

        return hook
