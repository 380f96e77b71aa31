"""TENT (Wang et al. 2021): entropy minimisation on every sample, adapting all LayerNorm affine parameters.

Every LayerNorm, as the IMSE repository's tent.py (75-92, 122-123), whose ViT rows the paper reports: CLIP's
``norm_pre``, MAE's ``fc_norm`` and the final ``norm`` too, under both protocols. (github DequanWang/tent tent.py
64-80 takes BatchNorm2d layers alone: on a ViT it would adapt nothing.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imse.core.losses import softmax_entropy
from imse.core.methods.base import TTAMethod
from imse.core.methods.norms import layernorm_params

__all__ = ["Tent"]


class Tent(TTAMethod):
    """SGD (momentum 0.9) at ``lr = base_lr · batch_size / 64`` unless ``lr`` is given."""

    name = "tent"
    label = "TENT"
    defaults = {"lr": None, "base_lr": 1e-3, "batch_size": 64, "momentum": 0.9, "margin": 0.4, "margin_classes": None}

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = layernorm_params(model)
        if not params:
            raise ValueError("TENT needs LayerNorm layers with affine parameters; this model has none")
        return params

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.learning_rate(self.hparams), momentum=self.hparams["momentum"])

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        self.optimizer.zero_grad()
        with self.probe.capture(detached=self.alignment_layers()) as stats:
            logits = self.run_model(x)
        entropy = softmax_entropy(logits)
        loss = entropy.mean()
        margin = self.entropy_margin(logits.shape[-1])
        record: dict[str, Any] = {
            "entropy": float(loss.detach()),
            "num_reliable": int((entropy.detach() < margin).sum()),
            "loss": float(loss.detach()),
            "updated": False,
            "skip_reason": None,
        }
        if self.record_alignment:
            record["alignment_std"] = self.alignment_record(stats)
        if not bool(torch.isfinite(loss)):
            record["skip_reason"] = "non-finite loss"
        else:
            loss.backward()
            grads_finite = all(
                bool(torch.isfinite(p.grad).all()) for p in self.trainable.values() if p.grad is not None
            )
            if grads_finite:
                self.optimizer.step()
                record["updated"] = True
            else:
                record["skip_reason"] = "non-finite gradient"
        self.optimizer.zero_grad()
        return logits.detach(), record
