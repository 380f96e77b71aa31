"""Shared fixtures. Tests never touch the network and run on CPU unless a test asks for CUDA explicitly."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Downloads and the SVD cache go to a per-run folder, never the user's ~/.cache.
os.environ["IMSE_CACHE"] = tempfile.mkdtemp(prefix="imse-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def tiny_vit(seed: int = 0, num_classes: int = 10, depth: int = 6, head_scale: float = 1.0) -> VisionTransformer:
    """A small random-init timm ViT for 32 px input (65 tokens). ``head_scale`` > 1 makes predictions confident,
    as a trained model's are, so that the reliable-sample filter keeps some samples."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=depth, num_heads=4, num_classes=num_classes
    )
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def vit_base_injected():
    """ViT-B/16 (random init) with every target layer decomposed: ~15 s of float64 SVD, so built once."""
    import timm

    from imse.core.spectral import inject

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    names = inject(model)
    return model, names
