"""Shared fixtures. Tests never touch the network and run on CPU unless a test asks for CUDA explicitly."""

import math
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


def layout_vit(options: dict, depth: int = 4, head_scale: float = 1.0):
    """A small timm ViT in one of ``VIT_LAYOUTS``, its LayerNorms drawn away from the identity (a skipped norm
    must show); ``head_scale`` as ``tiny_vit``'s."""
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
        vit.head.weight.mul_(head_scale)
    return vit


def run_side_by_side(method, reference, schedule, seed=1):
    """A method against a restatement of its official loop (DPAL, SAR: ``reference.threshold``/``margin``/
    ``params``). Each ``(images, threshold, E0)`` on both; returns our records and the largest difference seen in the
    predictions and the trainables after each batch."""
    generator, records, worst = torch.Generator().manual_seed(seed), [], 0.0
    for count, threshold, margin in schedule:
        x = torch.rand(count, 3, 32, 32, generator=generator)
        method.hparams.update(reset_threshold=threshold, margin=margin / math.log(10))
        reference.threshold, reference.margin = threshold, margin
        worst = max(worst, float((method(x) - reference(x)).abs().max()))
        weights = [float((p - reference.params[n]).detach().abs().max()) for n, p in method.trainable.items()]
        worst = max([worst, *weights])
        records.append(dict(method.last_record))
    return records, worst


def assert_equal_to_float32_rounding(now, expected, path="") -> None:
    """Equal, except floats, which may differ by float32 rounding carried through a few adaptation steps (1e-5
    relative): another thread count (another machine, a Ray or run worker, runs sharing the cores) rounds a float32
    sum differently, and each step carries that on (a DPAL loss three steps in: 1.1e-6 apart on the CI machine);
    counts, predictions and labels exactly."""
    if isinstance(expected, float) and not isinstance(now, bool):
        assert now == pytest.approx(expected, rel=1e-5, abs=1e-9), path
    elif isinstance(expected, dict):
        assert now.keys() == expected.keys(), path
        for key in expected:
            assert_equal_to_float32_rounding(now[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(now) == len(expected), path
        for index, (a, b) in enumerate(zip(now, expected)):
            assert_equal_to_float32_rounding(a, b, f"{path}[{index}]")
    else:
        assert now == expected, path


@pytest.fixture(scope="session")
def app():
    """``python app.py`` as users launch it, once for every test module that drives it: (process, url)."""
    from served import launch_app, stop_app

    process, url = launch_app()
    yield process, url
    stop_app(process)


@pytest.fixture(scope="session")
def app_url(app):
    return app[1]
