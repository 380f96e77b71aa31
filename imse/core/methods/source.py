"""Source: the pretrained model as it is, no adaptation (the floor every method must beat)."""

from __future__ import annotations

from typing import Any

import torch

from imse.core.losses import softmax_entropy
from imse.core.methods.base import TTAMethod

__all__ = ["Source"]


class Source(TTAMethod):
    name = "source"
    label = "Source"
    adapts = False
    step_passes = 1.0  # a forward
    defaults = {"margin": 0.4, "margin_classes": None}

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        with self.probe.capture(detached=self.alignment_layers()) as stats:
            logits = self.run_model(x)
        entropy = softmax_entropy(logits)
        margin = self.entropy_margin(logits.shape[-1])
        record: dict[str, Any] = {
            "entropy": float(entropy.mean()),
            "num_reliable": int((entropy < margin).sum()),
            "updated": False,
            "skip_reason": None,
        }
        if self.record_alignment:
            record["alignment_std"] = self.alignment_record(stats)
        return logits, record
