"""IMSE (ICLR 2026): adapt only the singular values of every ViT linear layer ("spectral experts").

Reliable-entropy minimisation with SAM (SAR's update), plus a diversity term that *maximises* the spread of
expert alignment in the last ``diversity_blocks`` blocks, whose own singular values stay frozen (the term acts
through their inputs). Defaults are the official code's: Adam lr 7e-3, λ_dm 50, ρ 0.05, E0 = 0.4·ln C.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import diversity_loss
from ..sam import SAM
from ..spectral import SpectralLinear, find_vit, inject, spectral_layers
from .base import SAMEntropyMethod

__all__ = ["IMSE"]


class IMSE(SAMEntropyMethod):
    name = "imse"
    defaults = {
        "lr": 7e-3,
        "lambda_dm": 50.0,
        "rho": 0.05,
        "margin": 0.4,
        "diversity_blocks": 3,
        "diversity_ratio": 1.0,
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
    }

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        prefix, vit = find_vit(model)
        depth = len(vit.blocks)
        frozen = self.hparams["diversity_blocks"]
        if not 0 < frozen < depth:
            raise ValueError(f"diversity_blocks must be in 1..{depth - 1} for a ViT with {depth} blocks, got {frozen}")
        if not spectral_layers(model):
            inject(model)  # every target layer of every block: the last blocks need their Vh for the diversity term
        names = {id(module): name for name, module in spectral_layers(model).items()}

        def layers_of(blocks) -> list[str]:
            return [names[id(m)] for block in blocks for m in block.modules() if isinstance(m, SpectralLinear)]

        self.diversity_layers = layers_of(vit.blocks[depth - frozen :])
        if not self.diversity_layers:
            raise ValueError(f"the last {frozen} blocks have no spectral layers; inject them first")
        self.diversity_weight = float(self.hparams["lambda_dm"])
        if self.diversity_weight == 0.0:
            self.diversity_layers = []  # no diversity term: do not pay for its statistics
        layers = spectral_layers(model)
        return {f"{name}.S": layers[name].S for name in layers_of(vit.blocks[: depth - frozen])}

    def diversity(self, stats: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.diversity_layers:
            return None
        return diversity_loss(
            [stats[name] for name in self.diversity_layers],
            num_blocks=self.hparams["diversity_blocks"],
            ratio=self.hparams["diversity_ratio"],
        )

    def build_optimizer(self, params: list[nn.Parameter]) -> SAM:
        base = torch.optim.Adam(
            params, lr=self.hparams["lr"], betas=tuple(self.hparams["betas"]), weight_decay=self.hparams["weight_decay"]
        )
        return self.wrap_optimizer(base)
