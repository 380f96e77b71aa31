"""ViDA's source warm-up: its adapters trained on labelled clean source images before any test stream.

The official ImageNet-C run does not start ViDA cold: it loads "our source ViDA model" (github Yangsenqiao/vida,
README; ``--checkpoint`` in bash/vida_vit.sh; loaded in imagenet/vida.py 199-202), a ViT whose adapters were
trained on the source domain first, as the ViDA paper describes. Cold (up-projections at zero) the adapters add
nothing, the scales they are given change nothing, and ViDA answers exactly as Source. The official repository
ships that checkpoint but not the code that made it; this module makes one for any backbone: the ViT frozen, the
adapters (both ranks, scales 1) trained with cross-entropy, Adam, on random batches of the source training split
(the built-in model: Fashion-MNIST's train split; a timm ViT: the user's ImageNet train folder). Steps, rate and
batch are this project's choices, written into the file with the data it saw.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imse.core.files import save_safetensors_atomic
from imse.core.methods.vida import WARMUP_FORMAT, ViDA, adapter_names, inject_adapters
from imse.core.spectral import find_vit
from imse.data.backbones import BUILTIN_DATA, backbone_data
from imse.data.fashion_mnist import BuiltinSource
from imse.data.models import BUILTIN, create_backbone
from imse.data.sources import ImageFolderSource, Source

__all__ = ["WARMUP_DEFAULTS", "warm_up", "warmup_source"]

WARMUP_DEFAULTS: dict[str, Any] = {"steps": 1000, "batch_size": 64, "lr": 1e-4, "seed": 0}


def warmup_source(backbone: str, data: str | None, size: int) -> Source:
    """The labelled clean training images of ``backbone``'s source domain (shipped for a backbone whose card's data
    is the built-in Fashion-MNIST)."""
    if data is None:
        if backbone_data(backbone) != BUILTIN_DATA:
            raise ValueError(f"a ViDA warm-up of {backbone} needs its source training images: --data <ImageNet train "
                             "folder, <wnid>/<images>>")  # fmt: skip
        return BuiltinSource("train")
    return ImageFolderSource(data, size)


def _held_out_accuracy(model: torch.nn.Module, backbone: str, device: str, count: int) -> float | None:
    """Clean accuracy on the first ``count`` images of the built-in data's test split (none for an ImageNet ViT)."""
    if backbone_data(backbone) != BUILTIN_DATA or count < 1:
        return None
    images, labels = BuiltinSource("test").load(range(count))
    correct = 0
    with torch.no_grad():
        for start in range(0, count, 500):
            logits = model(images[start : start + 500].to(device))
            correct += int((logits.argmax(-1).cpu() == labels[start : start + 500]).sum())
    return correct / count


def _train(model, trainable: list, source: Source, config: dict, *, progress: str | None, device: str) -> list[float]:
    """Adam on ``trainable`` with the cross-entropy of ``model`` on random batches of ``source``; every step's loss."""
    optimizer = torch.optim.Adam(trainable, lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config["steps"], desc=progress, unit="step")
    for _ in range(config["steps"]):
        indices = torch.randint(len(source), (config["batch_size"],), generator=generator).tolist()
        images, labels = source.load(indices)
        loss = F.cross_entropy(model(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    return losses


def warm_up(
    out: str | os.PathLike,
    *,
    backbone: str = BUILTIN,
    weights: str | None = None,
    data: str | None = None,
    preprocessing: str = "backbone",
    device: str = "cpu",
    progress: bool = True,
    held_out: int = 2000,
    **settings: Any,
) -> dict[str, Any]:
    """Train ViDA's adapters on ``backbone``'s source images and write them to ``out`` (safetensors, what
    ``create("vida", checkpoint=out)`` loads). ``preprocessing``: ``backbone`` (its own normalisation) or
    ``unit`` ([0, 1] images as they are: the official ViDA run); train as the runs that load it will use it.
    ``settings``: ``steps``, ``batch_size``, ``lr``, ``seed`` (``WARMUP_DEFAULTS``). ``held_out``: test images of
    the built-in model whose clean accuracy before and after goes into the file. Returns the file's metadata."""
    unknown = sorted(set(settings) - set(WARMUP_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown warm-up setting(s) {unknown}; known: {sorted(WARMUP_DEFAULTS)}")
    config = {**WARMUP_DEFAULTS, **settings}
    model = create_backbone(backbone, weights=weights, device=device)
    model.normalise_input = preprocessing != "unit"
    source = warmup_source(backbone, data, model.input_size)
    before = _held_out_accuracy(model, backbone, device, held_out)
    ranks = (ViDA.defaults["low_rank"], ViDA.defaults["high_rank"])
    torch.manual_seed(config["seed"])  # the adapters' initial draws
    inject_adapters(model, *ranks)
    vit = find_vit(model)[1]
    names = adapter_names(vit)
    model.requires_grad_(False).eval()
    parameters = dict(vit.named_parameters())
    started = time.perf_counter()
    losses = _train(model, [parameters[name].requires_grad_(True) for name in names], source, config,
                    progress=f"ViDA warm-up ({backbone})" if progress else None, device=device)  # fmt: skip
    model.eval()
    after = _held_out_accuracy(model, backbone, device, held_out)
    metadata = {"format": WARMUP_FORMAT, "backbone": backbone, "data": source.name, "images": str(len(source)),
                "preprocessing": preprocessing, "low_rank": str(ranks[0]), "high_rank": str(ranks[1]),
                **{key: str(value) for key, value in config.items()},
                "final_loss": f"{sum(losses[-20:]) / max(1, len(losses[-20:])):.6g}",
                "held_out_accuracy_before": str(before), "held_out_accuracy_after": str(after),
                "seconds": f"{time.perf_counter() - started:.1f}",
                "torch": torch.__version__}  # fmt: skip
    state = {name: copy.deepcopy(parameters[name].detach()).cpu().contiguous() for name in names}
    Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, Path(out).expanduser(), metadata)
    return metadata
