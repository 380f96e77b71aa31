"""The one rule for image batches at every public entry point (backbones, methods, the runner).

Images are float in [0, 1]; a ``uint8`` batch in [0, 255] — what PIL, torchvision's ``PILToTensor`` and our
corruption engine produce — is converted by ``x / 255``. Any other dtype is refused with a ``TypeError``:
integers fed straight into the normalisation made NaN logits without a word.
"""

from __future__ import annotations

import torch

__all__ = ["as_float_images", "vit_input"]


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if floating point (assumed in [0, 1]), ``x / 255`` as float32 if ``uint8``; else TypeError."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point():
        return x
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    raise TypeError(f"images must be float in [0, 1] or uint8 in [0, 255], got dtype {x.dtype}")


def vit_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the ViT inside ``model`` is fed: images in [0, 1] through the backbone's normalisation (its ``normalize``),
    unless a method switched it off (``normalise_input = False``: ``preprocessing="unit"``, the official ViDA run's
    bare ViT); a bare timm ViT, as they are. One rule for every forward: the backbone's, the bank's descriptors,
    DPAL's prompted network."""
    x = as_float_images(x)
    if hasattr(model, "normalize") and getattr(model, "normalise_input", True):
        return model.normalize(x)
    return x
