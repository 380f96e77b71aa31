"""Any timm ViT by its tag: checked, sized and described before a byte of its weights is fetched.

A visitor may type any timm tag. Before anything downloads, the tag is looked up in timm's own list of pretrained
weights (an unknown one is refused with the closest names), its model is built on the ``meta`` device (no memory,
no weights: ~0.3 s for ViT-B) to see its class and count its parameters, and its configuration says its input
size, normalisation and classes. Only timm's ``VisionTransformer`` passes (IMSE's spectral layers, the methods'
parameter choices and DPAL's prompts are written for its layout), only with a classifier whose classes are known
(entropy needs class probabilities), and only below the host's ``IMSE_MAX_BACKBONE_PARAMS``.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_BACKBONE_PARAMS",
    "ViTInfo",
    "forward_gflops",
    "imagenet_class_synonyms",
    "inspect_vit",
    "max_backbone_params",
]

DEFAULT_MAX_BACKBONE_PARAMS = 100_000_000  # ViT-B/16 (86.6 M) fits; ViT-L/16 (304 M) does not
_TAG = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
# how a sentence names the architectures people try most often (the rest: the class name, its words split)
_ARCHITECTURES = {
    "SwinTransformer": "a Swin Transformer",
    "SwinTransformerV2": "a Swin Transformer V2",
    "VisionTransformerDistilled": "a distilled DeiT (a second, distillation token and head)",
    "Eva": "an EVA transformer",
    "Beit": "a BEiT",
    "ResNet": "a ResNet",
    "ConvNeXt": "a ConvNeXt",
    "EfficientNet": "an EfficientNet",
    "MaxxVit": "a MaxViT",
    "VisionTransformerHybrid": "a hybrid CNN-ViT",
}


@dataclass(frozen=True)
class ViTInfo:
    """What a timm ViT tag is, read from its configuration and a model built on the ``meta`` device."""

    name: str
    params: int
    input_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    imagenet_subset: str | None  # timm's name for its classes ("imagenet-1k", "imagenet-21k-goog", ...)

    @property
    def imagenet_1k(self) -> bool:
        """Whether it classifies ImageNet-1k's 1000 classes (so Imagenette's labels score it directly)."""
        return self.imagenet_subset == "imagenet-1k"


def max_backbone_params() -> int:
    """The host's ``IMSE_MAX_BACKBONE_PARAMS`` (default 100 M): larger models are refused before any download."""
    raw = os.environ.get("IMSE_MAX_BACKBONE_PARAMS", "").strip()
    if not raw:
        return DEFAULT_MAX_BACKBONE_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"IMSE_MAX_BACKBONE_PARAMS={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"IMSE_MAX_BACKBONE_PARAMS must be positive, got {raw!r}")
    return value


def _architecture_phrase(cls: type) -> str:
    name = cls.__name__
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name]
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return f"{'an' if words[:1].lower() in 'aeiou' else 'a'} {words}"


@functools.cache
def _pretrained_tags() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_pretrained())


def _closest(name: str) -> str:
    """The tags of the same model first (a bare name's weights), then the most similar ones."""
    same = [tag for tag in _pretrained_tags() if tag.startswith(name + ".")][:3]
    near = same or difflib.get_close_matches(name, _pretrained_tags(), n=3, cutoff=0.6)
    return f"; the closest tags: {', '.join(near)}" if near else ""


@functools.cache
def inspect_vit(name: str) -> ViTInfo:
    """``name`` (a timm tag with its weights, e.g. ``vit_small_patch16_224.augreg_in21k_ft_in1k``) as a ``ViTInfo``,
    or a ``ValueError`` that says in one sentence why IMSE Lab cannot adapt it: not a tag, an unknown tag (with the
    closest ones), another architecture, no classifier with known classes, or more parameters than the host
    allows. Nothing is downloaded."""
    if not isinstance(name, str) or len(name) > 120 or not _TAG.match(name):
        bare = isinstance(name, str) and re.fullmatch(r"[a-z0-9_]+", name or "") is not None
        hint = " with its weight tag (the bare name maps to other weights in newer timm)" if bare else ""
        raise ValueError(
            f"{str(name)[:80]!r} is not a timm tag: name a model{hint}, e.g. vit_small_patch16_224.augreg_in21k_ft_in1k"
            + (_closest(name) if bare else "")
        )
    if name not in _pretrained_tags():
        raise ValueError(f"timm has no weights tagged {name!r}{_closest(name)}")
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as error:  # an architecture that cannot be built without real tensors
        raise ValueError(f"{name} could not be inspected before download ({type(error).__name__}: {error})") from None
    if type(model) is not VisionTransformer:
        raise ValueError(f"IMSE Lab adapts ViTs; {name} is {_architecture_phrase(type(model))}")
    cfg = model.pretrained_cfg
    subset = _class_subset(cfg)
    if model.num_classes == 0 or subset is None:
        head = (
            "no classifier"
            if model.num_classes == 0
            else f"a {model.num_classes}-way head whose classes timm does not name"
        )
        raise ValueError(
            f"{name} has {head}: IMSE adapts a classifier (its entropy needs class probabilities); pick a tag "
            "fine-tuned on ImageNet, e.g. one ending in _in1k"
        )
    params = sum(p.numel() for p in model.parameters())
    limit = max_backbone_params()
    if params > limit:
        raise ValueError(
            f"{name} has {params / 1e6:.1f} M parameters; this server takes ViTs of at most {limit / 1e6:.0f} M "
            "(IMSE_MAX_BACKBONE_PARAMS)"
        )
    return ViTInfo(
        name=name,
        params=params,
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        num_classes=model.num_classes,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        imagenet_subset=subset,
    )


def _class_subset(cfg: dict) -> str | None:
    from timm.data import infer_imagenet_subset

    try:
        return infer_imagenet_subset(cfg)
    except Exception:  # a configuration timm cannot place
        return None


@functools.cache
def imagenet_class_synonyms(subset: str) -> tuple[tuple[str, ...], ...]:
    """Per class of timm's ``subset``, in index order: its WordNet id, then each of its names (``"tench, Tinca
    tinca"`` gives ``tench`` and ``Tinca tinca``), all shipped with timm (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo(subset)
    return tuple(
        (wnid, *(part.strip() for part in description.split(",") if part.strip()))
        for wnid, description in zip(info.label_names(), info.label_descriptions(), strict=True)
    )


@functools.cache
def forward_gflops(name: str) -> float:
    """GFLOPs of one image's forward pass through the ViT ``name`` (a card's, a timm tag, or a bare timm
    architecture), counted from its shapes on the ``meta`` device: every ``nn.Linear`` over every token (2 FLOPs
    per multiply-add), attention's two ``N x N x d`` products per block, and the patch embedding. What a run of an
    architecture nobody measured costs is scaled from a measured one by this (``imse.app.run_cost``)."""
    import torch

    model = _meta_model(name)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.head.in_features * model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    width = model.embed_dim
    attention = len(model.blocks) * 2 * tokens * tokens * width
    patches = model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches
    return 2 * ((linear - head) * tokens + head + attention + patches) / 1e9


def _meta_model(name: str):
    """The architecture of ``name`` on the ``meta`` device (no memory, no weights)."""
    import timm
    import torch

    from imse.data.backbones import SHIPPED, backbone_card

    card = backbone_card(name)
    with torch.device("meta"):
        if card is not None and card.weights == SHIPPED:
            from imse.core.resources import asset_path
            from imse.data.models import build_builtin_vit, builtin_config

            return build_builtin_vit(builtin_config(asset_path(card.assets)))
        return timm.create_model(name, pretrained=False)
