"""One card per backbone: everything a run, the Lab and reproduce need to know about it, in one place.

A card says what the backbone is called and shown as, which data it classifies, its input size, where its
weights come from (shipped with the package, the Hugging Face hub, or the user's own file), the validation
sweep and the files its methods start from, and which of the paper's backbones it plays. Adding a backbone is
one ``BackboneCard`` in ``CARDS``; everything else reads it from there (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "BUILTIN",
    "BUILTIN_DATA",
    "CARDS",
    "HUB",
    "IMAGENET_DATA",
    "SHIPPED",
    "USER_FILE",
    "BackboneCard",
    "backbone_card",
    "backbone_data",
    "backbone_label",
    "hub_backbones",
    "lab_backbones",
    "paper_backbones",
]

BUILTIN = "builtin"
# where a backbone's weights come from
SHIPPED = "shipped"  # under the package's assets: offline, always there
HUB = "hub"  # the Hugging Face hub (or its local cache), named by timm's weight tag
USER_FILE = "user file"  # only the user has them (e.g. an MAE fine-tuned checkpoint): ``weights=`` / ``--weights``
# the data a backbone classifies, by the data names of ``imse.data.builders.build_source``
BUILTIN_DATA = "builtin"  # the shipped Fashion-MNIST split
IMAGENET_DATA = "imagenette"  # ImageNet's classes: the Lab streams Imagenette


@dataclass(frozen=True)
class BackboneCard:
    """One backbone's facts.

    ``name``: what runs, records and the CLI call it (a timm name carries its weight tag: the bare name maps to
    other weights in newer timm). ``assets``: for shipped weights, the folder under assets holding its
    ``config.json`` (architecture, normalisation, classes) and ``model.safetensors``. ``sweep``: its validation
    sweep's JSON under ``assets/results`` (the tuned settings runs start from). ``start_files``: method -> the
    files it starts from, ``{setting: path parts under assets}``. ``paper_role``: the paper's name for it in
    ``python -m imse reproduce`` (supervised, mae, clip). ``cost_as``: the measured architecture whose step times a
    Lab run's cost is read from (same shapes, or more FLOPs; ``imse.app.run_cost``). ``pad_small``: a user's image
    no larger than ``input_size`` is centred on black, as the model's training images were (the built-in model: 28-px
    Fashion-MNIST padded to 32), instead of resized and cropped (``imse.data.uploads``).
    """

    name: str
    label: str
    data: str
    input_size: int
    weights: str
    assets: str | None = None
    sweep: str | None = None
    start_files: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    paper_role: str | None = None
    cost_as: str | None = None
    pad_small: bool = False

    def __post_init__(self) -> None:
        if self.weights not in (SHIPPED, HUB, USER_FILE):
            raise ValueError(f"{self.name}: weights must be {SHIPPED!r}, {HUB!r} or {USER_FILE!r}")
        if (self.weights == SHIPPED) != (self.assets is not None):
            raise ValueError(f"{self.name}: a card names its assets folder exactly when its weights are shipped")

    @property
    def in_lab(self) -> bool:
        """The Lab offers the backbones whose weights it can get by itself: a public page takes no weights file."""
        return self.weights in (SHIPPED, HUB)


def _hub(name: str, label: str, cost_as: str, paper_role: str | None = None) -> BackboneCard:
    """An ImageNet-1k ViT at 224 px with its weights on the hub."""
    return BackboneCard(name, label, IMAGENET_DATA, 224, HUB, paper_role=paper_role, cost_as=cost_as)


# The registry, in the Lab's menu order (the built-in model first).
CARDS: dict[str, BackboneCard] = {
    card.name: card
    for card in (
        BackboneCard(
            BUILTIN,
            "built-in ViT (Fashion-MNIST, offline)",
            BUILTIN_DATA,
            32,
            SHIPPED,
            assets="builtin",
            sweep="sweep_builtin.json",
            # ViDA's source warm-up (``python -m imse vida-warmup``: its adapters trained on Fashion-MNIST's train
            # split; the recipe is in the file)
            start_files={"vida": {"checkpoint": ("builtin", "vida_warmup.safetensors")}},
            cost_as="builtin",
            pad_small=True,
        ),
        _hub("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "ViT-Ti/16 AugReg (IN-21k → IN-1k)", "vit_small_patch16_224"),
        _hub("vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16 AugReg (IN-21k → IN-1k)", "vit_small_patch16_224"),
        _hub(
            "vit_base_patch16_224.augreg_in21k_ft_in1k",
            "ViT-B/16 AugReg (IN-21k → IN-1k), the IMSE paper's",
            "vit_base_patch16_224",
            paper_role="supervised",
        ),
        _hub("deit_small_patch16_224.fb_in1k", "DeiT-S/16 (IN-1k)", "vit_small_patch16_224"),
        _hub("deit_base_patch16_224.fb_in1k", "DeiT-B/16 (IN-1k)", "vit_base_patch16_224"),
        _hub(
            "vit_base_patch16_clip_224.openai_ft_in1k",
            "CLIP ViT-B/16, fine-tuned on IN-1k",
            "vit_base_patch16_224",
            paper_role="clip",
        ),
        # the paper's MAE ViT-B/16 fine-tuned on IN-1k: timm's ``.mae`` weights are the pre-trained encoder without
        # a classifier, so the fine-tuned checkpoint is the user's (facebookresearch/mae's, a .pth)
        BackboneCard(
            "vit_base_patch16_224.mae",
            "MAE ViT-B/16, fine-tuned on IN-1k (your checkpoint)",
            IMAGENET_DATA,
            224,
            USER_FILE,
            paper_role="mae",
            cost_as="vit_base_patch16_224",
        ),
    )
}


def backbone_card(name: str) -> BackboneCard | None:
    """The card of ``name``, or None for a timm architecture outside the registry (run with the user's weights)."""
    return CARDS.get(name)


def backbone_data(name: str) -> str:
    """The data the Lab streams for ``name``: its card's, else ImageNet's (any other timm ViT classifies them)."""
    card = backbone_card(name)
    return card.data if card else IMAGENET_DATA


def backbone_label(name: str) -> str:
    """The name people read for ``name`` (the Lab's menu); the bare name for a backbone without a card."""
    card = backbone_card(name)
    return card.label if card else name


def lab_backbones() -> list[str]:
    """The backbones the Lab offers, in its menu's order."""
    return [name for name, card in CARDS.items() if card.in_lab]


def hub_backbones() -> dict[str, str]:
    """Name -> label of the backbones whose weights come from the hub (what a Space lists to preload)."""
    return {name: card.label for name, card in CARDS.items() if card.weights == HUB}


def paper_backbones() -> dict[str, BackboneCard]:
    """The paper's backbones by their role in ``reproduce`` (supervised, mae, clip)."""
    return {card.paper_role: card for card in CARDS.values() if card.paper_role}
