"""Teach view 3, one IMSE step dissected: on one corrupted batch, which samples pass the entropy filter, what SAM
does to the loss, the two terms of the objective and their weighted sum, which experts' σ moved most, and what
the model predicts before and after.

Everything shown is read off the method's own step (its record and its code before and after), never
recomputed by a second implementation: what the view says happened is what IMSE did.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from imse.core.losses import softmax_entropy
from imse.core.methods import create
from imse.core.spectral import get_code
from imse.data.corruptions import corrupt

__all__ = ["StepExplorer", "StepReport"]


@dataclass
class StepReport:
    batch: int  # 1-based: batches adapted on so far, this one included
    entropy: list[float]  # per sample, before the update
    margin: float  # E0: samples with entropy below it are reliable
    reliable: list[bool]
    loss: float | None  # the objective at the current code (SAM's first pass)
    loss_perturbed: float | None  # the same objective at the SAM-perturbed code (second pass)
    entropy_term: float | None  # mean entropy of the reliable samples
    diversity: float | None  # L_dm
    lambda_dm: float
    weighted_sum: float | None  # entropy_term − λ_dm · L_dm (equals ``loss``)
    moved: list[tuple[str, int, float, float]]  # (layer, expert, Δσ, σ before), largest |Δσ| first
    labels: list[int]
    before: list[int]  # predictions with the code before the step (the method's own pre-update logits)
    after: list[int]  # predictions of the updated model on the same batch
    updated: bool
    skip_reason: str | None


class StepExplorer:
    """IMSE on a private copy of ``model``, stepping through corrupted batches of ``images`` one at a time."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        corruption: str,
        severity: int,
        *,
        batch_size: int = 64,
        seed: int = 0,
        top: int = 8,
        **settings,
    ) -> None:
        self.method = create("imse", copy.deepcopy(model), **settings)
        corrupted = corrupt(images, corruption, severity, generator=torch.Generator().manual_seed(seed))
        self.batches = [
            (corrupted[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)
        ]
        self.top = top
        self.done = 0

    def reset(self) -> None:
        """Back to the source code and the first batch."""
        self.method.reset()
        self.done = 0

    def step(self) -> StepReport:
        x, labels = self.batches[self.done % len(self.batches)]
        code_before = get_code(self.method.model)
        logits = self.method(x)  # adapts as a side effect; the logits are the pre-update ones
        record = self.method.last_record
        self.done += 1
        with torch.no_grad():
            after = self.method.model(x).argmax(-1)
        names = list(code_before)
        code_after = get_code(self.method.model)
        deltas = torch.cat([code_after[name] - code_before[name] for name in names])
        owners = [(name, i) for name in names for i in range(len(code_before[name]))]
        largest = torch.topk(deltas.abs(), min(self.top, len(deltas))).indices.tolist()
        moved = [(*owners[j], float(deltas[j]), float(code_before[owners[j][0]][owners[j][1]])) for j in largest]
        entropy = softmax_entropy(logits.float())
        margin = self.method.entropy_margin(logits.shape[-1])
        lambda_dm = float(self.method.hparams["lambda_dm"])
        term, diversity = record.get("entropy_loss"), record.get("diversity")
        weighted = None if term is None else term - lambda_dm * (diversity or 0.0)
        return StepReport(
            batch=self.done,
            entropy=entropy.tolist(),
            margin=float(margin),
            reliable=(entropy < margin).tolist(),
            loss=record.get("loss"),
            loss_perturbed=record.get("loss_second"),
            entropy_term=term,
            diversity=diversity,
            lambda_dm=lambda_dm,
            weighted_sum=weighted,
            moved=moved,
            labels=labels.tolist(),
            before=logits.argmax(-1).tolist(),
            after=after.tolist(),
            updated=bool(record.get("updated")),
            skip_reason=record.get("skip_reason"),
        )
