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


# the timm ViT layouts the hub backbones use (imse.data.models): plain (augreg), pre-norm (CLIP), average pool (MAE)
VIT_LAYOUTS = {
    "plain": {},
    "pre-norm (CLIP)": {"pre_norm": True},
    "average pool (MAE)": {"global_pool": "avg", "fc_norm": True},
}


def layout_vit(options: dict, depth: int = 4):
    """A small timm ViT in one of ``VIT_LAYOUTS``, its LayerNorms drawn away from the identity (a skipped norm
    must show)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10, **options
    ).eval()
    with torch.no_grad():
        for module in vit.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return vit
