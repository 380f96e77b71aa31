"""The "What is a spectral expert?" tab, as plain functions (the app only wires them).

A spectral layer computes ``y = Σ_i σ_i u_i (v_iᵀ x)``: expert *i* writes along ``u_i``, scaled by ``σ_i``, as much
as the input points along ``v_i``. Because the ``u_i`` are orthonormal, the outputs of two different experts are
orthogonal for *any* input — which ``expert_cosines`` checks on a real image.
"""

from __future__ import annotations

import io
import threading
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from imse.core.spectral import SpectralLinear, inject, spectral_layers
from imse.data.models import create_backbone

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "expert_cosines",
    "load_user_image",
    "predict",
    "sample_images",
    "spectral_backbone",
]

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 16_000_000  # decompression bombs are refused before decoding
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}


@lru_cache(maxsize=2)
def spectral_backbone(name: str = "builtin"):
    """A frozen backbone with every target layer decomposed (cached: the SVD runs once per backbone)."""
    from imse.core.svd_cache import default_svd_cache

    backbone = create_backbone(name)
    inject(backbone, cache=default_svd_cache())
    backbone.requires_grad_(False)
    _add_scaling_hooks(backbone)
    return backbone


# The σ-scaling knob on a model that every visitor shares: nothing is written to the model. A forward hook on each
# spectral layer adds (scale − 1)·σ_i·u_i(v_iᵀx) to the layer's output when the calling thread's context asks for
# it, so two visitors scaling different experts at once each see only their own.
_SCALED: ContextVar[tuple[nn.Module, int, float] | None] = ContextVar("imse_teach_scaled_expert", default=None)
_HOOKS_LOCK = threading.Lock()


def _scaling_hook(module: SpectralLinear, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    scaled = _SCALED.get()
    if scaled is None or scaled[0] is not module:
        return None
    _, i, scale = scaled
    alignment = args[0] @ module.Vh[i]  # v_iᵀ x for every token
    return output + ((scale - 1.0) * module.S[i] * alignment)[..., None] * module.U[:, i]


def _add_scaling_hooks(backbone: nn.Module) -> None:
    with _HOOKS_LOCK:
        for module in spectral_layers(backbone).values():
            if not getattr(module, "_teach_scaling_hook", False):
                module.register_forward_hook(_scaling_hook)
                module._teach_scaling_hook = True


def sample_images(count: int = 6) -> list[tuple[torch.Tensor, str]]:
    """Bundled sample images for the built-in backbone: the first test image of each of ``count`` classes."""
    from imse.data.fashion_mnist import CLASS_NAMES, load_shipped, to_rgb32

    images, labels = load_shipped("test")
    picks, seen = [], set()
    for image, label in zip(images, labels):
        if int(label) not in seen:
            seen.add(int(label))
            picks.append((to_rgb32(image[None])[0], CLASS_NAMES[int(label)]))
        if len(picks) == count:
            break
    return picks


def load_user_image(path: str | Path, size: int) -> torch.Tensor:
    """A user's upload as uint8 ``[3, size, size]``; ``ValueError`` with a readable reason for anything that is
    not a modest image file (type, byte size, pixel count — checked from the header, before decoding)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    size_bytes = path.stat().st_size
    if size_bytes > MAX_UPLOAD_BYTES:
        raise ValueError(f"the file is {size_bytes / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError("that file is not an image (PNG, JPEG, WebP, BMP or GIF)") from error
    if kind not in ALLOWED_FORMATS:
        raise ValueError(f"{kind} images are not accepted; use PNG, JPEG, WebP, BMP or GIF")
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"the image has {width * height:,} pixels; the limit is {MAX_UPLOAD_PIXELS:,}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"the image could not be decoded: {error}") from error
    from imse.data.sources import prepare_image

    return prepare_image(image, size)


@torch.no_grad()
def expert_cosines(backbone, layer: str, image: torch.Tensor, experts: int = 16) -> list[list[float]]:
    """Cosine similarity between the outputs of the ``experts`` largest experts of ``layer`` on ``image``
    (over all tokens): the identity matrix, up to float error."""
    module: SpectralLinear = spectral_layers(backbone)[layer]
    captured = {}
    handle = module.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    backbone(image[None].float() / 255)
    handle.remove()
    x = captured["x"][0]  # [tokens, in]
    k = min(experts, module.rank)
    projections = x @ module.Vh[:k].T  # [tokens, k]
    outputs = [
        (projections[:, i : i + 1] * module.S[i] * module.U[:, i][None]).flatten() for i in range(k)
    ]  # expert i's contribution to every token's output
    stacked = torch.stack(outputs)
    normed = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (normed @ normed.T).tolist()


@torch.no_grad()
def predict(backbone, image: torch.Tensor, layer: str | None = None, expert: int = 0, scale: float = 1.0):
    """Class probabilities with expert ``expert`` of ``layer`` scaled by ``scale``, computed without touching
    the (shared) model: safe while other threads use it."""
    if not layer:
        return torch.softmax(backbone(image[None].float() / 255)[0], -1).tolist()
    _add_scaling_hooks(backbone)
    token = _SCALED.set((spectral_layers(backbone)[layer], int(expert), float(scale)))
    try:
        logits = backbone(image[None].float() / 255)
    finally:
        _SCALED.reset(token)
    return torch.softmax(logits[0], -1).tolist()
