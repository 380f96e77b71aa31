"""SAR (Niu et al. 2023): reliable, sharpness-aware entropy minimisation of the LayerNorms, with model recovery."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imse.core.methods.base import SAMEntropyMethod
from imse.core.methods.norms import lower_norm_params
from imse.core.sam import SAM, momentum_step
from imse.core.spectral import find_vit

__all__ = ["SAR"]


class SAR(SAMEntropyMethod):
    """LayerNorm affine below the last ``frozen_blocks`` blocks (not the final norm); SAM over SGD (momentum
    0.9) at ``lr = base_lr · batch_size / 64``; the model is reset to its initial state when the EMA (0.9) of
    the step-2 loss falls below ``reset_threshold`` (a sign of collapse to confident, wrong predictions).

    ``official_recovery=True`` (the paper protocol) does what the official code does (github mr-eggplant/SAR,
    ``sar.py`` and ``sam.py``), in three ways:

    - after a reset the low EMA is put back (its ``reset()`` clears it, ``forward`` then restores it: sar.py 50-61),
      so resets repeat until the loss rises; the EMA is checked after every batch, updated or not (sar.py 100-104);
    - a reset restores the adapted weights but keeps SGD's momentum: it loads SAM's state dict, which holds only
      SAM's own state (sam.py 65-67), not the base optimizer's, so the momentum moves the restored weights at the
      next step;
    - a batch with no reliable sample (at either pass) still takes the base step, with zero gradients (a mean over
      no sample is NaN and back-propagates zeros: sar.py 83, 91, 96-97): SGD's momentum alone moves the weights.

    Ours (the default, the lab protocol) clears the EMA and SGD's momentum at a reset, and moves nothing on an
    empty filter (the update is skipped and counted).

    Which LayerNorms (``imse.core.methods.norms.lower_norm_params``): ours, those below the frozen blocks (CLIP's
    ``norm_pre`` too, not MAE's ``fc_norm``); ``official_norms=True`` (the paper protocol), the official
    collect_params' (sar.py 109-138): every one outside the frozen blocks but the final ``norm``, so ``fc_norm``
    too."""

    name = "sar"
    label = "SAR"
    sweep_checks = (("margin_classes", (None, 1000)),)

    @classmethod
    def paper_settings(cls, scenario: str) -> dict[str, Any]:
        return {"margin_classes": 1000, "official_recovery": True, "official_norms": True}

    defaults = {
        "lr": None,
        "base_lr": 1e-3,
        "batch_size": 64,
        "momentum": 0.9,
        "rho": 0.05,
        "margin": 0.4,
        "margin_classes": None,
        "frozen_blocks": 3,
        "reset_threshold": 0.2,
        "ema_momentum": 0.9,
        "official_recovery": False,
        "official_norms": False,  # True: the official collect_params' LayerNorms (MAE's fc_norm too)
    }

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        prefix, vit = find_vit(model)
        self.ema: float | None = None
        return lower_norm_params(vit, self.hparams["frozen_blocks"], self.hparams["official_norms"], prefix)

    def build_optimizer(self, params: list[nn.Parameter]) -> SAM:
        lr = self.learning_rate(self.hparams)
        return self.wrap_optimizer(torch.optim.SGD(params, lr=lr, momentum=self.hparams["momentum"]))

    def after_update(self, record: dict[str, Any]) -> None:
        if record["updated"] and record["loss_second"] is not None:
            m = self.hparams["ema_momentum"]
            loss = record["loss_second"]
            self.ema = loss if self.ema is None else m * self.ema + (1 - m) * loss
        recovered = self.ema is not None and self.ema < self.hparams["reset_threshold"]
        if recovered and self.hparams["official_recovery"]:
            self.restore_weights()  # the EMA and SGD's momentum stay
        elif recovered:
            self.restore_initial()
            self.ema = None
        record["loss_ema"] = self.ema
        record["recovered"] = recovered

    @torch.no_grad()
    def restore_weights(self) -> None:
        """The adapted weights back to their initial values; the optimizer's state untouched."""
        for name, param in self.trainable.items():
            param.copy_(self._initial_params[name])

    def on_empty_filter(self, record: dict[str, Any]) -> None:
        if self.hparams["official_recovery"]:
            momentum_step(self.optimizer.base_optimizer)
            record["momentum_only"] = True

    def reset_state(self) -> None:
        self.ema = None
