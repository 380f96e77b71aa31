"""The two evaluation protocols of a benchmark run.

``paper``: every rule as the official code (github baek85/IMSE, at b8632d6) applies it, so that a difference from
the paper's table is the method's, not the harness's — the default for ImageNet data. ``lab``: this project's own
choices (the default for the built-in data and the app). ``RULES`` lists each difference with the official file
and line it follows; docs/protocol.md renders the same table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from imse.core.images import as_float_images
from imse.core.methods import METHODS
from imse.data.sources import PROTOCOLS, ImageFolderSource, ImageNetCSource

__all__ = [
    "PROTOCOLS",
    "RULES",
    "Rule",
    "imagenet_c_domains",
    "method_overrides",
    "missing_under",
    "resolve",
    "official_source_images",
]


@dataclass(frozen=True)
class Rule:
    item: str
    paper: str
    lab: str
    official: str  # where the official code does it


RULES = (
    Rule("ImageNet-C images", "RobustBench's 5,000-image list, in order; each 224 px file resized to 256 and "
         "centre-cropped to 224 again", "every image of the folder, as stored",
         "robustbench/data.py 146-181 (load_imagenetc, image list + 'Res256Crop224'), 17-20"),
    Rule("CTTA method", "shift detection + top-1 retrieval, Adam reset on retrieval", "plain IMSE",
         "cfgs/vit/imse.yaml 25-39 (DYNAMIC True, top1_adapt, DSS_K 0.05); method/svd.py 163-175, 342-344"),
    Rule("bank slot 0", "2,000 clean ImageNet validation images (random.seed(1) shuffle), EMA 0.8 over batches "
         "of 64, short batches skipped", "clean source images pooled (every image once)",
         "main.py 251-253; selectedRotateImageFolder.py 137-143; method/domain_info.py 90-93, 176-181"),
    Rule("recurring", "a disjoint slice of one permutation of all 50,000 images per round; IMSE lr 3e-3",
         "the same images every round; the default lr", "main.py 58-66, 97-103; bash/3_imse_recurring.sh 2-3"),
    Rule("entropy margin E0", "0.4·ln 1000 for every model (SAR and IMSE)", "0.4·ln C", "method/svd.py 47, 152"),
    Rule("DPAL", "E0 = 0.4·ln 1000; the prediction is the second pass's (perturbed prompts, after the predictors' "
         "step); the similarity weight is reliable / the configured batch size", "0.4·ln C; the first pass's "
         "(pre-update); reliable / the batch's own size (they differ on a short last batch)",
         "yushuntang/DPAL dpal.py 99-140 (113); main.py 182, 200, 418"),
    Rule("DPAL recovery", "a reset restores the weights and the predictors' optimizer; the SGD momentum under SAM "
         "survives (loading SAM's state dict leaves its base optimizer's state); an empty reliable set still steps "
         "both optimizers (momentum only)", "a reset clears both optimizers' momentum; an empty reliable set skips "
         "the update", "yushuntang/DPAL dpal.py 61-66, 113-130, 231-235; sam.py 60-62"),
    Rule("SAR recovery", "after a reset the low loss EMA is put back (resets repeat, checked after every batch) and "
         "SGD's momentum survives (as DPAL's); an empty filter still steps (momentum only)", "EMA and momentum "
         "cleared after a reset; an empty filter skips the update",
         "mr-eggplant/SAR sar.py 50-61, 83-104; sam.py 65-67"),
    Rule("SAR and DPAL's LayerNorms", "the official selection: every LayerNorm outside the last three blocks but "
         "the final norm, so CLIP's norm_pre and MAE's fc_norm too (SAR official_norms; DPAL official_forward, "
         "whose network never reads norm_pre: it stays)", "the LayerNorms below the last three blocks: blocks "
         "0..depth-4 and CLIP's norm_pre; MAE's fc_norm (its final norm, after the pool) stays, as the final norm "
         "does", "mr-eggplant/SAR sar.py 109-138; yushuntang/DPAL dpal.py 158-198"),
    Rule("DPAL's network", "the published DPAL ViT (official_forward): no norm_pre; MAE's average pool takes the CLS "
         "token in with the patches (and every prompt but the first)", "timm's ViT around the prompts: CLIP's "
         "norm_pre, and the head's pool sees the model's own tokens", "yushuntang/DPAL models/dpal_transformer.py "
         "74-91"),
    Rule("ViDA start", "its source warm-up, required (--checkpoint vida=FILE: the official 'source ViDA model', or "
         "one made by python -m imse vida-warmup); without one the run is refused", "the warm-up the backbone ships "
         "(built-in model), else the adapters as initialised (up-projections zero: ViDA then answers as Source)",
         "Yangsenqiao/vida README ('our source ViDA model'), bash/vida_vit.sh (--checkpoint), "
         "imagenet/vida.py 199-202"),
    Rule("ViDA preprocessing", "[0, 1] images fed to the bare timm ViT, no normalisation (preprocessing='unit')",
         "the backbone's own normalisation, as every other method",
         "Yangsenqiao/vida cfgs/vit/vida.yaml 23 (Standard_VITB), robustbench/model_zoo/imagenet.py 89-92; "
         "baek85/IMSE's *_vida architectures, model_zoo/imagenet.py 100-118"),
)  # fmt: skip


def resolve(protocol: str | None, imagenet_data: bool) -> str:
    """``None`` means the default: ``paper`` on ImageNet data, ``lab`` otherwise."""
    if protocol is None:
        return "paper" if imagenet_data else "lab"
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def method_overrides(protocol: str, method: str, scenario: str) -> dict[str, Any]:
    """What the protocol sets on a method before the run's own overrides (which still win): under ``paper`` the
    method's own ``paper_settings``."""
    return METHODS[method].paper_settings(scenario) if protocol == "paper" else {}


def missing_under(protocol: str, method: str, settings: dict[str, Any]) -> list[str]:
    """Why ``method`` with these (final) ``settings`` cannot run under ``protocol``: one sentence per setting it
    lacks (the method's ``paper_requires``); empty when it can."""
    if protocol != "paper":
        return []
    needs = METHODS[method].paper_requires
    return [
        f"{method} needs {key} under --protocol paper: {why}" for key, why in needs.items() if not settings.get(key)
    ]


def imagenet_c_domains(root: str, protocol: str, scenario: str, size: int):
    """The per-domain source of pre-generated ImageNet-C a stream reads, as the protocol wants it."""
    images = "all" if protocol == "paper" and scenario == "recurring" else "list"

    def pregenerated(domain):
        return ImageNetCSource(root, domain.corruption, domain.severity, size=size, protocol=protocol, images=images)

    return pregenerated


def official_source_images(root: str, size: int, count: int = 2000) -> torch.Tensor:
    """Bank slot 0's clean images as the official code picks them: ``count`` ImageNet validation images after
    ``random.seed(1)`` and a shuffle of the sorted file list, resized to 256 and centre-cropped (float in [0, 1])."""
    source = ImageFolderSource(root, size)
    order = list(range(len(source)))
    random.Random(1).shuffle(order)
    images, _ = source.load(order[:count])
    return as_float_images(images)
