"""The Teach tab's models and images: one shared, decomposed backbone per name; sample images that fit it;
labelled images for the views; uploads checked before they are decoded."""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import gradio as gr
import torch

from imse.core.resources import asset_path
from imse.core.spectral import inject
from imse.data.backbones import BUILTIN_DATA, backbone_card, backbone_data
from imse.data.models import BUILTIN, create_backbone
from imse.runs.explain import experts

__all__ = [
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "eval_set",
    "load_user_image",
    "sample_images",
    "spectral_backbone",
    "stream_images",
    "view_images",
]

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 16_000_000  # decompression bombs are refused before decoding
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF"}
EVAL_IMAGES = 128  # view 1's fixed labelled set (built-in backbone): one pass ~0.25 s on 2 cores
VIEW_IMAGES = 256  # views 2 and 4: clean images to corrupt and describe
STREAM_IMAGES = 2560  # view 3's stream (built-in backbone): 40 batches of 64, long enough for adapting to show


@lru_cache(maxsize=2)
def spectral_backbone(name: str = BUILTIN):
    """A frozen backbone with every target layer decomposed (cached: the SVD runs once per backbone)."""
    from imse.core.svd_cache import default_svd_cache

    backbone = create_backbone(name)
    inject(backbone, cache=default_svd_cache())
    backbone.requires_grad_(False)
    return backbone


def input_size(backbone_name: str) -> int:
    """The side the backbone's images have: its card's, else the built model's (a timm name outside the cards)."""
    card = backbone_card(backbone_name)
    return card.input_size if card else spectral_backbone(backbone_name).input_size


@lru_cache(maxsize=1)
def fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    from imse.data.fashion_mnist import load_shipped, to_rgb32

    count = EVAL_IMAGES + max(VIEW_IMAGES, STREAM_IMAGES)
    images, labels = load_shipped("test")
    return to_rgb32(images[:count]), torch.as_tensor(labels[:count]).long()


@lru_cache(maxsize=2)
def photos(size: int) -> list[tuple[torch.Tensor, str]]:
    """The bundled photos (assets/samples, CC0 / public domain: see its NOTICE.md) at ``size`` px (read once)."""
    from PIL import Image

    from imse.data.sources import prepare_image

    entries = json.loads(asset_path("samples", "samples.json").read_text())
    photos = []
    for entry in entries:
        with Image.open(asset_path("samples", entry["file"])) as image:
            photos.append((prepare_image(image.convert("RGB"), size), entry["label"]))
    return photos


def sample_images(backbone_name: str = BUILTIN, count: int = 6) -> list[tuple[torch.Tensor, str]]:
    """Sample images that fit the backbone: the first test image of ``count`` Fashion-MNIST classes for one whose
    data is the built-in set, the bundled photos at the model's input size for ImageNet backbones."""
    if backbone_data(backbone_name) != BUILTIN_DATA:
        return photos(input_size(backbone_name))
    from imse.data.fashion_mnist import CLASS_NAMES

    images, labels = fashion_test()
    picks, seen = [], set()
    for image, label in zip(images, labels.tolist()):
        if label not in seen:
            seen.add(label)
            picks.append((image, CLASS_NAMES[label]))
        if len(picks) == count:
            break
    return picks


def view_images(backbone_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled clean images for views 2–4: Fashion-MNIST test images for the built-in backbone, Imagenette's
    validation images for ImageNet ones (only if already downloaded: the Lab's first run downloads it)."""
    if backbone_data(backbone_name) == BUILTIN_DATA:
        images, labels = fashion_test()
        return images[EVAL_IMAGES : EVAL_IMAGES + VIEW_IMAGES], labels[EVAL_IMAGES : EVAL_IMAGES + VIEW_IMAGES]
    from imse.data.sources import imagenette_source

    try:
        source = imagenette_source(size=input_size(backbone_name))
    except RuntimeError as error:
        raise gr.Error(f"views 2–4 need Imagenette for ImageNet backbones: {error}") from None
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:VIEW_IMAGES]
    return source.load(order.tolist())


def stream_images(backbone_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """View 3's stream: ``STREAM_IMAGES`` Fashion-MNIST test images for the built-in backbone (after view 1's set;
    views 2 and 4 use its first ``VIEW_IMAGES``), the views' Imagenette images for ImageNet backbones."""
    if backbone_data(backbone_name) == BUILTIN_DATA:
        images, labels = fashion_test()
        return images[EVAL_IMAGES : EVAL_IMAGES + STREAM_IMAGES], labels[EVAL_IMAGES : EVAL_IMAGES + STREAM_IMAGES]
    return view_images(backbone_name)


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


@lru_cache(maxsize=2)
def eval_set(backbone_name: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """View 1's fixed set: labelled Fashion-MNIST test images for the built-in backbone; for ImageNet backbones
    the bundled photos, scored by agreement with the unedited model (they have no ImageNet labels)."""
    if backbone_data(backbone_name) == BUILTIN_DATA:
        images, labels = fashion_test()
        return images[:EVAL_IMAGES], labels[:EVAL_IMAGES], "accuracy"
    backbone = spectral_backbone(backbone_name)
    images = torch.stack([image for image, _ in photos(backbone.input_size)])
    return images, experts.probabilities(backbone, images).argmax(-1), "agreement with all experts"
