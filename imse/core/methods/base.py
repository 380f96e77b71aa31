"""The common shape of a test-time adaptation method: adapt on ``forward``, ``reset`` exactly, count what adapts.

A method wraps a model (and owns it from then on: it sets ``requires_grad`` and eval mode in place).
``forward(x)`` returns the logits used for accuracy and adapts as a side effect; it never sees labels.
After each call ``last_record`` holds a plain dict describing the step (loss terms, reliable samples,
whether the update was applied, and optionally the alignment std of every spectral layer).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar, TypedDict

import torch
from torch import nn

from imse.core.images import as_float_images
from imse.core.losses import AlignmentProbe, entropy_margin, masked_mean, softmax_entropy
from imse.core.sam import SAM
from imse.core.spectral import spectral_layers

__all__ = ["PRECISIONS", "SAMEntropyMethod", "StepRecord", "TTAMethod", "precision_scope"]


class StepRecord(TypedDict, total=False):
    """What one ``method(x)`` call records (``method.last_record``): plain numbers, JSON-ready. Every method
    sets the first four; a method that updates, its losses and whether (and why not) it updated; a method with a
    domain bank (IMSE with retrieval), the bank's events; ``record_alignment=True`` adds every spectral layer's
    per-expert alignment std."""

    method: str  # the method's registry name (``imse.core.methods.METHODS``)
    step: int  # calls so far, this one included
    batch_size: int
    skipped_updates: int  # updates skipped so far (no reliable sample, non-finite loss or gradient)
    entropy: float  # mean prediction entropy of the batch, before the update
    num_reliable: int  # samples under the entropy margin E0 (step 1)
    num_reliable_second: int  # the same at SAM's perturbed point (step 2)
    entropy_loss: float | None
    diversity: float | None  # L_dm (IMSE)
    loss: float | None
    loss_second: float | None
    grad_norm: float | None
    updated: bool
    skip_reason: str | None  # why this batch did not update, else None
    alignment_std: dict[str, list[float]]  # layer -> per-expert std (record_alignment=True)
    shift_score: float | None  # IMSE with retrieval: KL to the current domain, None before the first
    shift_detected: bool
    stored_slot: int | None
    retrieved_slot: int | str | None  # a slot, "mix", or None
    slot_distances: list[float]
    bank_size: int


# Settings every method has: "precision" (``precision_scope``, ``TTAMethod.run_model``): "fp32", "tf32" (TF32
# matmuls and convolutions on CUDA for the whole step; nothing changes on the CPU) or "bf16" (the forward passes
# under bfloat16 autocast, GPU or CPU); "preprocessing" is what the ViT is fed: "backbone" (the backbone's own input
# normalisation) or "unit" (the [0, 1] images as they are, as the official ViDA run feeds its bare timm ViT; needs
# a backbone that can switch its normalisation off, ``imse.data.models.Backbone``).
COMMON_DEFAULTS: dict[str, Any] = {"precision": "fp32", "preprocessing": "backbone"}
PRECISIONS = ("fp32", "tf32", "bf16")
PREPROCESSINGS = ("backbone", "unit")


def _finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device | str) -> Iterator[None]:
    """What a whole step (forwards, backwards, optimiser) runs under. ``"tf32"`` on a CUDA ``device``: TF32
    matmuls and cuDNN convolutions (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``),
    the previous global flags restored afterwards, however the step ends. On the CPU TF32 does not exist: nothing
    changes, and a tf32 step equals the fp32 one bit for bit. ``"fp32"`` and ``"bf16"`` change nothing here (bf16
    is autocast around the forwards alone: ``TTAMethod.run_model``)."""
    if precision != "tf32" or torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# The official TENT/SAR rule: a rate given for batches of this size scales with the batch (lr = base_lr · B / 64).
LR_REFERENCE_BATCH = 64


class TTAMethod(nn.Module):
    """Base class. Subclasses set ``name`` and ``defaults`` and implement ``configure`` and ``step``.

    A method also says, as class attributes, everything the rest of the project needs to know about it (the
    registry ``imse.core.methods.METHODS`` is the only other place it is named): ``label`` (menus and tables),
    ``adapts`` (False: nothing to adapt, tune or time), ``coupled_rates`` (its other rates that move with ``lr`` at
    the official ratio), ``sweep_checks`` (the validation sweep's second stage), ``menu_variants`` (more Lab menu
    entries: label -> settings), ``paper_settings`` / ``paper_requires`` (the paper protocol) and
    ``learning_rate`` (its lr rule)."""

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}
    label: ClassVar[str] = "base"
    adapts: ClassVar[bool] = True
    coupled_rates: ClassVar[tuple[str, ...]] = ()
    # (setting, candidate values): tried one at a time at the chosen lr, in this order; a tie goes to its default
    sweep_checks: ClassVar[tuple[tuple[str, tuple], ...]] = ()
    menu_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    paper_requires: ClassVar[dict[str, str]] = {}  # setting -> why the paper protocol refuses to run without it
    # a step's cost in forward passes (a backward counts two): what a Lab run's estimate reads for a method that
    # no measurement lists (``imse.app.run_cost``)
    step_passes: ClassVar[float] = 3.0

    @classmethod
    def paper_settings(cls, scenario: str) -> dict[str, Any]:
        """What ``--protocol paper`` sets on this method in ``scenario``: the official code's choices
        (docs/protocol.md), before a run's own overrides."""
        return {}

    @classmethod
    def learning_rate(cls, settings: dict[str, Any]) -> float | None:
        """The rate the optimizer uses with these settings: ``lr`` when set, else ``base_lr · batch_size / 64``
        (TENT's and SAR's official rule); ``None`` for a method without either."""
        if settings.get("lr") is not None:
            return float(settings["lr"])
        if settings.get("base_lr") is not None:
            return settings["base_lr"] * settings.get("batch_size", LR_REFERENCE_BATCH) / LR_REFERENCE_BATCH
        return None

    @classmethod
    def rate_scales_with_batch(cls) -> bool:
        """Whether this method's rate follows the batch size (TENT's and SAR's official rule: a ``base_lr`` for
        batches of 64); IMSE's Adam rate does not."""
        return "base_lr" in cls.defaults

    @classmethod
    def takes_batch_size(cls) -> bool:
        """Whether this method reads the stream's batch size (TENT and SAR scale their rate by it, IMSE detects
        shifts only on full batches)."""
        return "batch_size" in cls.defaults

    @classmethod
    def base_rate(cls, lr: float, batch_size: int) -> float:
        """The ``base_lr`` that gives ``lr`` at ``batch_size`` (the inverse of ``learning_rate``'s rule)."""
        return lr * LR_REFERENCE_BATCH / batch_size

    def __init__(self, model: nn.Module, record_alignment: bool = False, **overrides: Any) -> None:
        super().__init__()
        known = {**COMMON_DEFAULTS, **self.defaults}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"{self.name} has no setting(s) {unknown}; known: {sorted(known)}")
        self.hparams: dict[str, Any] = {**known, **overrides}
        if self.hparams["precision"] not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.hparams['precision']!r}")
        if self.hparams["preprocessing"] not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {self.hparams['preprocessing']!r}")
        if self.hparams["preprocessing"] == "unit":
            if not hasattr(model, "normalise_input"):
                raise TypeError(f"preprocessing='unit' needs a model with its own input normalisation to switch off "
                                f"(imse.data.models.Backbone), not {type(model).__name__}")  # fmt: skip
            model.normalise_input = False
        self.model = model
        self.record_alignment = record_alignment
        # Adaptation must not be random: dropout and stochastic depth stay off (timm ViTs have none by default,
        # so this equals the official code's train mode for them).
        model.eval()
        self.trainable: dict[str, nn.Parameter] = self.configure(model)
        model.requires_grad_(False)  # after configure: it may add parameters (IMSE injects spectral layers)
        for param in self.trainable.values():
            param.requires_grad_(True)
        self.optimizer = self.build_optimizer(list(self.trainable.values())) if self.trainable else None
        self.probe = AlignmentProbe(spectral_layers(model))
        self.last_record: StepRecord = {}
        self.steps = 0
        self.skipped_updates = 0
        self._initial_params = {name: p.detach().clone() for name, p in self.trainable.items()}
        self._initial_optimizer = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    # -- to implement -------------------------------------------------------------------------------------
    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Prepare ``model`` and return the parameters to adapt, by qualified name."""
        return {}

    def build_optimizer(self, params: list[nn.Parameter]):
        raise NotImplementedError

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """One adaptation step on batch ``x``: returns (logits for accuracy, record)."""
        raise NotImplementedError

    def reset_state(self) -> None:
        """Reset method-specific running state (e.g. SAR's loss EMA)."""

    # -- common behaviour ---------------------------------------------------------------------------------
    def run_model(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """A forward of ``model`` (default: the adapted one; ViDA's teacher, DPAL's prompted ViT go through here
        too); with ``precision="bf16"`` under bfloat16 autocast. The adapted values (IMSE's ``S``), the optimiser's
        state and the losses stay float32: the logits come back as float32 and the losses reduce in float32
        (``imse.core.losses``). SVDs are not forwards: they run as they always do."""
        model = self.model if model is None else model
        if self.hparams["precision"] == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return model(x).float()
        return model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapt on one batch and return its logits from before the update. Images: float in [0, 1] or uint8 in
        [0, 255] (``imse.images``)."""
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        x = as_float_images(x)
        with precision_scope(self.hparams["precision"], x.device):
            logits, record = self.step(x)
        self.steps += 1
        if record.get("skip_reason"):
            self.skipped_updates += 1
        record.update(
            method=self.name, step=self.steps, batch_size=int(x.shape[0]), skipped_updates=self.skipped_updates
        )
        self.last_record = record
        return logits.detach()

    @torch.no_grad()
    def restore_initial(self) -> None:
        """Adapted parameters and optimizer state back to their values at construction."""
        for name, param in self.trainable.items():
            param.copy_(self._initial_params[name])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer))

    def reset(self) -> None:
        """Restore the state at construction exactly (parameters, optimizer, counters, running state)."""
        self.restore_initial()
        self.reset_state()
        self.steps = 0
        self.skipped_updates = 0
        self.last_record = {}

    def entropy_margin(self, num_classes: int) -> float:
        """The reliability margin ``E0 = margin · ln C``; ``margin_classes`` replaces C (the official code uses
        1000 for every model, which on a 10-class model keeps every sample: E0 = 2.76 > ln 10)."""
        return entropy_margin(self.hparams.get("margin_classes") or num_classes, self.hparams["margin"])

    def num_trainable(self) -> int:
        """Number of scalar values this method adapts."""
        return sum(p.numel() for p in self.trainable.values())

    def alignment_layers(self) -> list[str]:
        """Layers whose (detached) alignment std goes into the record: all spectral layers when asked."""
        return list(self.probe.layers) if self.record_alignment else []

    def alignment_record(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: stats[name].detach().float().cpu() for name in self.alignment_layers() if name in stats}


class SAMEntropyMethod(TTAMethod):
    """SAR's update, shared by SAR and IMSE: reliable-entropy minimisation with two SAM passes.

    Step 1: forward, keep ``H < E0``, loss = mean kept entropy − ``diversity_weight · L_dm``, backward,
    SAM ascent. Step 2: forward at the perturbed weights, re-filter inside the step-1 set, same loss, backward,
    restore and base step. The logits returned are step 1's (pre-update). An empty filter drops the entropy
    term; a non-finite loss or gradient skips the update (and is counted) — no NaN ever reaches the weights.
    """

    diversity_layers: list[str] = []  # spectral layers whose alignment std must keep its graph
    diversity_weight: float = 0.0
    step_passes = 6.0  # two forwards, each with its backward

    def diversity(self, stats: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The term to *maximise* (IMSE's ``L_dm``), subtracted with ``diversity_weight``; SAR has none."""
        return None

    def wrap_optimizer(self, base: torch.optim.Optimizer) -> SAM:
        return SAM(base, rho=self.hparams["rho"])

    def _loss(self, entropy: torch.Tensor, keep: torch.Tensor, stats: dict) -> tuple[torch.Tensor | None, dict]:
        entropy_term = masked_mean(entropy, keep)
        reg = self.diversity(stats)
        parts: dict[str, float | None] = {
            "entropy_loss": None if entropy_term is None else float(entropy_term.detach()),
            "diversity": None if reg is None else float(reg.detach()),
        }
        loss = entropy_term
        if reg is not None and self.diversity_weight:
            loss = (loss if loss is not None else 0.0) - self.diversity_weight * reg
        return loss, parts

    def after_update(self, record: dict[str, Any]) -> None:
        """Called after every step with its record (SAR's model recovery lives here)."""

    def on_empty_filter(self, record: dict[str, Any]) -> None:
        """Called when no sample passes the filter (step 1, or step 2 after SAM's weights were restored): by
        default nothing moves (the update is skipped and counted)."""

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        self.optimizer.zero_grad()
        with self.probe.capture(differentiable=self.diversity_layers, detached=self.alignment_layers()) as stats:
            logits = self.run_model(x)
        margin = self.entropy_margin(logits.shape[-1])
        entropy = softmax_entropy(logits)
        keep = entropy.detach() < margin
        loss, parts = self._loss(entropy, keep, stats)
        record: dict[str, Any] = {
            "entropy": float(entropy.detach().mean()),
            "num_reliable": int(keep.sum()),
            "num_reliable_second": 0,
            **parts,
            "loss": None,
            "loss_second": None,
            "grad_norm": None,
            "updated": False,
            "skip_reason": None,
        }
        if self.record_alignment:
            record["alignment_std"] = self.alignment_record(stats)
        logits = logits.detach()
        del stats
        if self._ascend(loss, record):
            record["updated"] = self._descend(x, keep, margin, record)
        return self._finish(logits, record)

    def _ascend(self, loss: torch.Tensor | None, record: dict[str, Any]) -> bool:
        """SAM's step 1 on the first pass's loss: backward, then the ascent to the perturbed weights. False (the
        reason in ``record``) when there is nothing to follow: no reliable sample, or a non-finite loss or gradient
        (the weights are then as they were)."""
        if loss is None:
            record["skip_reason"] = "no reliable samples"
            self.on_empty_filter(record)
            return False
        record["loss"] = float(loss.detach())
        if not _finite(loss.detach()):
            record["skip_reason"] = "non-finite loss (step 1)"
            return False
        loss.backward()
        sam: SAM = self.optimizer
        record["grad_norm"] = float(sam.first_step(zero_grad=True))
        if not sam.perturbed:
            record["skip_reason"] = "non-finite gradient (step 1)"
            return False
        return True

    def _descend(self, x: torch.Tensor, keep: torch.Tensor, margin: float, record: dict[str, Any]) -> bool:
        """SAM's step 2: a second pass at the perturbed weights, re-filtered inside step 1's reliable set
        (``keep``), backward, then the weights restored and the base step taken. False (the reason in ``record``,
        the weights restored) when a pass keeps no sample or its loss or gradient is not finite."""
        sam: SAM = self.optimizer
        with self.probe.capture(differentiable=self.diversity_layers) as stats:
            logits = self.run_model(x)
        entropy = softmax_entropy(logits)
        keep = keep & (entropy.detach() < margin)
        record["num_reliable_second"] = int(keep.sum())
        loss, _ = self._loss(entropy, keep, stats)
        if loss is None:
            sam.restore()
            record["skip_reason"] = "no reliable samples (step 2)"
            self.on_empty_filter(record)
            return False
        record["loss_second"] = float(loss.detach())
        if not _finite(loss.detach()):
            sam.restore()
            record["skip_reason"] = "non-finite loss (step 2)"
            return False
        loss.backward()
        if not _finite(sam.grad_norm()):
            sam.restore()
            record["skip_reason"] = "non-finite gradient (step 2)"
            return False
        sam.second_step(zero_grad=True)
        return True

    def _finish(self, logits: torch.Tensor, record: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        self.optimizer.zero_grad()
        self.after_update(record)
        return logits, record
