"""Teach view 1, spectral experts: what a layer's experts are worth, by keeping only the k largest or scaling one.

A spectral layer computes ``y = Σ_i σ_i u_i (v_iᵀ x) + b``. Editing the σ vector edits the layer: zeroing all but
the k largest σ gives the best rank-k approximation of its weight (Eckart–Young), scaling one σ turns one expert
up or down. The edits are tried on a model that several visitors share, so nothing is written to it
(``imse.core.spectral.evaluated_with``: this call's forward passes only).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from imse.core.methods import create
from imse.core.spectral import evaluated_with, merge, spectral_layers

__all__ = [
    "ALL_LAYERS",
    "accuracy",
    "energy",
    "keep_largest",
    "probabilities",
    "scale_expert",
    "trainable_counts",
]

ALL_LAYERS = "every layer"  # keep_largest's scope that truncates every spectral layer at once


def keep_largest(model: nn.Module, k: int, layer: str = ALL_LAYERS) -> dict[str, torch.Tensor]:
    """σ vectors that keep the ``k`` largest experts of ``layer`` (or of every layer) and zero the rest."""
    layers = spectral_layers(model)
    names = list(layers) if layer == ALL_LAYERS else [layer]
    sigmas = {}
    for name in names:
        S = layers[name].S.detach()
        kept = torch.zeros_like(S)
        top = torch.topk(S, min(max(int(k), 0), S.numel())).indices
        kept[top] = S[top]
        sigmas[name] = kept
    return sigmas


def scale_expert(model: nn.Module, layer: str, expert: int, factor: float) -> dict[str, torch.Tensor]:
    """The σ vector of ``layer`` with expert ``expert``'s σ multiplied by ``factor``."""
    S = spectral_layers(model)[layer].S.detach().clone()
    S[int(expert)] *= float(factor)
    return {layer: S}


def energy(S: torch.Tensor) -> torch.Tensor:
    """Cumulative share of ``Σσ²`` (the squared Frobenius norm) held by the k largest experts, k = 1..r."""
    squares = torch.sort(S.detach().double(), descending=True).values ** 2
    return (squares.cumsum(0) / squares.sum()).float()


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, sigmas: dict[str, torch.Tensor] | None = None):
    """Class probabilities of ``images`` (uint8 or float in [0, 1]), with ``sigmas`` edited in if given."""
    with evaluated_with(model, sigmas or {}):
        return torch.softmax(model(images).float(), -1)


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sigmas: dict[str, torch.Tensor] | None = None
) -> float:
    """Top-1 accuracy on labelled images with ``sigmas`` edited in (in chunks: any number of images)."""
    correct = 0
    with evaluated_with(model, sigmas or {}):  # the edited weights are merged once, not once per chunk
        for start in range(0, len(images), 256):
            predicted = model(images[start : start + 256]).argmax(-1).cpu()
            correct += int((predicted == labels[start : start + 256]).sum())
    return correct / max(len(images), 1)


def trainable_counts(model: nn.Module, settings: dict[str, dict] | None = None) -> dict[str, int]:
    """How many values each method adapts on ``model`` (its ``num_trainable``, as the Lab's results table counts
    them), and ``"all weights"``: every parameter of the model before its layers were decomposed. Each method
    is built on a copy: ``model`` is never changed."""
    settings = settings or {}
    counts = {}
    for name in ("imse", "sar", "tent"):
        counts[name] = create(name, copy.deepcopy(model), **settings.get(name, {})).num_trainable()
    plain = copy.deepcopy(model)
    merge(plain)
    counts["all weights"] = sum(p.numel() for p in plain.parameters())
    return counts
