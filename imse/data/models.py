"""Backbones: the built-in offline ViT and timm ViTs, each with its input normalisation folded in.

Every backbone takes float images in [0, 1] at ``input_size``; the normalisation its weights were trained with
comes from the weights' own config (timm's ``pretrained_cfg``: AugReg ViTs use 0.5/0.5, DeiT ImageNet stats,
CLIP its own). Getting it wrong costs up to 20 points, so nobody downstream normalises by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from imse.core.images import vit_input
from imse.core.resources import asset_path, offline
from imse.data.backbones import (
    BUILTIN,
    CARDS,
    IMAGENET_DATA,
    SHIPPED,
    USER_FILE,
    BackboneCard,
    backbone_card,
)
from imse.data.upload_layout import ClassMatch
from imse.data.uploads import ModelView
from imse.data.vit_tags import imagenet_class_synonyms, inspect_vit

__all__ = [
    "BUILTIN",
    "Backbone",
    "BackboneUnavailable",
    "create_backbone",
    "hub_reachable",
    "load_state_dict_file",
    "model_view",
]

Download = Callable[[int, "int | None", str], None]  # (bytes so far, total bytes or None, what downloads)


class BackboneUnavailable(RuntimeError):
    """The weights cannot be had here (offline hub, missing file); the message says how to supply them."""


class Backbone(nn.Module):
    """A timm ViT behind its own input normalisation: ``forward`` takes float images in [0, 1]."""

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        name: str,
        class_names: list[str],
        input_size: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.name = name
        self.class_names = list(class_names)
        self.input_size = int(input_size)
        # False: the ViT gets the [0, 1] images as they are (``preprocessing="unit"`` of a method: the official ViDA
        # run feeds its bare timm ViT so); its mean and std stay as they are for everyone else
        self.normalise_input = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images in [0, 1] (float) or [0, 255] (uint8); see ``imse.core.images``."""
        return self.model(vit_input(self, x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, classes={self.num_classes}"


def builtin_config(directory: Path | None = None) -> dict:
    path = (directory or asset_path("builtin")) / "config.json"
    return json.loads(Path(path).read_text())


def build_builtin_vit(config: dict) -> nn.Module:
    """The built-in architecture (a small timm VisionTransformer for 32×32 input) from its config."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**config["architecture"])


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a ``.pth``/``.pt`` file through ``torch.load(weights_only=True)``
    (no pickle code runs); unwraps ``{"model": ...}``/``{"state_dict": ...}`` and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise BackboneUnavailable(f"weights file {path} " + ("is not a file" if path.exists() else "does not exist"))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors' own error types for empty, truncated or garbled files
            raise BackboneUnavailable(f"{path} is not a readable safetensors weights file: {error}") from error
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # pickle payloads beyond tensors and containers are refused here
            raise BackboneUnavailable(
                f"{path} could not be loaded safely (torch.load weights_only=True): {error}"
            ) from error
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneUnavailable(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_weights(model: nn.Module, state: dict, source, name: str, strict: bool):
    """``model.load_state_dict``, with a shape mismatch (weights of another size) reported against the file."""
    try:
        return model.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        detail = "; ".join(str(error).splitlines()[1:4]).strip()
        raise BackboneUnavailable(f"{source} does not fit {name}: {detail or error}") from error


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` s (never offline: ``offline()``)."""
    if offline():
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(model_name: str) -> str | None:
    """The locally cached weights of a timm hub model, if any (so an offline machine can still use them)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


@lru_cache(maxsize=4)
def _imagenet_match(subset: str) -> ClassMatch:
    return ClassMatch.of(imagenet_class_synonyms(subset))


def model_view(name: str) -> ModelView:
    """How the backbone ``name`` sees an image (input size, small images padded or resized) and its classes'
    names, without building it: a shipped card's ``config.json``, an ImageNet card's, or any timm ViT tag's
    configuration (``imse.data.vit_tags``: an unknown tag, another architecture or a model too large is refused
    here, before any download)."""
    card = backbone_card(name)
    if card is not None and card.weights == SHIPPED:
        config = builtin_config(asset_path(card.assets))
        names = config["class_names"]
        match = ClassMatch.of([[class_name] for class_name in names])
        return ModelView(config["input_size"], card.pad_small, match, f"{card.name}:" + "|".join(names))
    if card is not None and card.data == IMAGENET_DATA and card.weights == USER_FILE:
        return ModelView(card.input_size, card.pad_small, _imagenet_match("imagenet-1k"), "imagenet-1k")
    info = inspect_vit(name)
    return ModelView(info.input_size, False, _imagenet_match(info.imagenet_subset), info.imagenet_subset)


def _class_names(name: str, num_classes: int) -> list[str]:
    """What the classes are called: the tag's own ImageNet subset (``imse.data.vit_tags``), else ImageNet-1k's for
    a 1000-way head (a user's weights file for a timm architecture), else their numbers."""
    try:
        subset = inspect_vit(name).imagenet_subset
    except ValueError:  # not a tag (a user's file for an architecture): its head's size says
        subset = "imagenet-1k" if num_classes == 1000 else None
    if subset is None:
        return [str(i) for i in range(num_classes)]
    names = [synonyms[1] if len(synonyms) > 1 else synonyms[0] for synonyms in imagenet_class_synonyms(subset)]
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def create_backbone(
    name: str = BUILTIN, weights: str | os.PathLike | None = None, device="cpu", *, on_download: Download | None = None
) -> Backbone:
    """A ready-to-use, eval-mode backbone, built as its card (``imse.data.backbones``) says.

    ``builtin``: the shipped Fashion-MNIST ViT (offline). Any timm ViT tag (the hub cards, or any other: checked
    before download by ``imse.data.vit_tags``): weights from the Hugging Face hub or its local cache,
    ``on_download(done, total, what)`` following a download. Any timm ViT architecture with ``weights=`` a local
    safetensors/``.pth`` file (e.g. an MAE fine-tuned ViT-B, whose card asks for it). Offline without weights, a
    hub model fails within seconds with a ``BackboneUnavailable`` saying how to supply them.
    """
    card = backbone_card(name)
    if card is not None and card.weights == SHIPPED:
        return _shipped_backbone(card, weights).to(device).eval()
    if card is not None and card.weights == USER_FILE and weights is None:
        raise BackboneUnavailable(
            f"{name} ({card.label}) has no weights to download: supply yours with weights=<file> (CLI: --weights "
            "model.safetensors or a .pth state dict)"
        )
    import timm

    base = name.split(".")[0]
    if base not in timm.list_models():
        raise ValueError(f"unknown backbone {name!r}: use one of {sorted(CARDS)}, or a timm name")
    model = _timm_from_file(name, weights) if weights is not None else _timm_from_hub(name, on_download)
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    names = _class_names(name, model.num_classes)
    backbone = Backbone(model, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), name=name, class_names=names,
                        input_size=size)  # fmt: skip
    return backbone.to(device).eval()


def _shipped_backbone(card: BackboneCard, weights: str | os.PathLike | None) -> Backbone:
    """A backbone shipped under assets: the architecture, normalisation and classes its ``config.json`` holds, its
    ``model.safetensors`` (or ``weights``, a file of the same architecture)."""
    config = builtin_config(asset_path(card.assets))
    model = build_builtin_vit(config)
    source = Path(weights) if weights else asset_path(card.assets, "model.safetensors")
    _load_weights(model, load_state_dict_file(source), source, card.name, strict=True)
    return Backbone(model, mean=config["mean"], std=config["std"], name=card.name, class_names=config["class_names"],
                    input_size=config["input_size"])  # fmt: skip


def _timm_from_file(name: str, weights: str | os.PathLike) -> nn.Module:
    """A timm architecture with the user's weights, its classifier sized and pooled as the file's."""
    import timm

    state = load_state_dict_file(weights)
    head = state.get("head.weight")
    # MAE's fine-tuned ViTs classify the average patch token through fc_norm (its global_pool=True)
    pool = {"global_pool": "avg"} if "fc_norm.weight" in state else {}
    classes = head.shape[0] if head is not None else 1000
    model = timm.create_model(name, pretrained=False, num_classes=classes, **pool)
    from timm.models.vision_transformer import checkpoint_filter_fn

    with contextlib.suppress(Exception):  # converts original (e.g. MAE/DeiT) layouts; timm's own pass through
        state = checkpoint_filter_fn(state, model)
    missing, unexpected = _load_weights(model, state, weights, name, strict=False)
    if missing or unexpected:
        raise BackboneUnavailable(
            f"{weights} does not fit {name}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return model


def _relay(on_download: Download, what: str):
    """A tqdm class that also tells ``on_download`` (the Lab's progress bar) how far a hub download is."""
    from tqdm.auto import tqdm

    class Relay(tqdm):
        done = 0  # counted here: a bar the hub disabled (HF_HUB_DISABLE_PROGRESS_BARS) counts nothing itself

        def update(self, n=1):
            shown = super().update(n)
            self.done += n or 0
            on_download(int(self.done), int(self.total) if self.total else None, what)
            return shown

    return Relay


def _download_weights(name: str, on_download: Download | None) -> str:
    """The tag's weights file, downloaded once into the hub's cache (``on_download`` follows it)."""
    import timm
    from huggingface_hub import hf_hub_download

    repo = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if not repo:
        raise BackboneUnavailable(f"{name} has no weights on the Hugging Face hub that timm knows of")
    what = f"Downloading {name}'s weights (once; then cached)"
    extra = {"tqdm_class": _relay(on_download, what)} if on_download else {}
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo, filename, **extra)
        except Exception as error:  # the hub's own errors: missing file, network, disk
            errors.append(f"{filename}: {type(error).__name__}")
    raise BackboneUnavailable(f"{name}'s weights could not be downloaded from {repo} ({'; '.join(errors)})")


def _timm_from_hub(name: str, on_download: Download | None = None) -> nn.Module:
    """A timm model with its tagged hub weights, from the local cache when they are there."""
    import timm

    base = name.split(".")[0]
    if "." not in name:
        raise ValueError(
            f"name the hub weights with their tag (e.g. {base}.augreg_in21k_ft_in1k): the bare name {name!r} "
            "silently maps to other weights in newer timm"
        )
    inspect_vit(name)  # an unknown tag, another architecture or a model too large: refused before any download
    cached = _cached_hub_file(name)
    if cached is None and not hub_reachable():
        raise BackboneUnavailable(
            f"{name} needs its weights from the Hugging Face hub, which is not reachable from here. Supply them "
            f"with weights=<file> (CLI: --weights model.safetensors or a .pth state dict), or download them once "
            f"on a connected machine (python -c \"import timm; timm.create_model('{name}', pretrained=True)\") "
            "and copy the Hugging Face cache (~/.cache/huggingface) here. The offline default is 'builtin'."
        )
    weights = cached or _download_weights(name, on_download)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights})
