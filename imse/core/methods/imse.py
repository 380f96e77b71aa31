"""IMSE (ICLR 2026): adapt only the singular values of every ViT linear layer ("spectral experts").

Reliable-entropy minimisation with SAM (SAR's update), plus a diversity term that *maximises* the spread of
expert alignment in the last ``diversity_blocks`` blocks, whose own singular values stay frozen (the term acts
through their inputs). Defaults are the official code's: Adam lr 7e-3, λ_dm 50, ρ 0.05, E0 = 0.4·ln C.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from imse.core.bank import (
    DESCRIPTOR_MOMENTUM,
    SHIFT_THRESHOLD,
    Descriptor,
    DomainBank,
    ShiftDetector,
    batch_descriptor,
    patch_tokens,
)
from imse.core.losses import diversity_loss
from imse.core.methods.base import SAMEntropyMethod
from imse.core.optim import Adam
from imse.core.sam import SAM
from imse.core.spectral import (
    SpectralLinear,
    code_layers,
    find_vit,
    get_code,
    inject,
    relative_code,
    set_code,
    spectral_layers,
)
from imse.core.svd_cache import default_svd_cache

__all__ = ["IMSE"]


class IMSE(SAMEntropyMethod):
    name = "imse"
    label = "IMSE"
    sweep_checks = (("lambda_dm", (0.0, 10.0, 50.0, 200.0)), ("margin_classes", (None, 1000)))
    menu_variants = {
        "IMSE, λ_dm = 0 (no diversity loss)": {"lambda_dm": 0.0},
        "IMSE + retrieval (top-1)": {"retrieval": "top1"},
        "IMSE + retrieval (mix)": {"retrieval": "mix"},
    }

    @classmethod
    def paper_settings(cls, scenario: str) -> dict[str, Any]:
        """Retrieval (top-1) with the EMA source descriptor on every continual stream; lr 3e-3 when recurring
        (bash/3_imse_recurring.sh); E0 = 0.4·ln 1000 for every model."""
        settings: dict[str, Any] = {"margin_classes": 1000, "source_descriptor": "ema"}
        if scenario != "single":
            settings["retrieval"] = "top1"
        if scenario == "recurring":
            settings["lr"] = 3e-3
        return settings

    defaults = {
        "lr": 7e-3,
        "lambda_dm": 50.0,
        "rho": 0.05,
        "margin": 0.4,
        "margin_classes": None,  # C in E0 = margin · ln C: None = the model's classes; the official code: 1000
        "diversity_blocks": 3,
        "diversity_ratio": 1.0,
        "betas": (0.9, 0.999),
        "weight_decay": 0.0,
        # continual TTA (docs/domain-bank.md); retrieval None = plain IMSE
        "retrieval": None,  # None, "top1" or "mix"
        "shift_threshold": SHIFT_THRESHOLD,
        "descriptor_momentum": DESCRIPTOR_MOMENTUM,
        "batch_size": 64,  # a "full" batch: only those update the domain descriptor
        "bank_capacity": 32,
        "mix_temperature": 1.0,
        "source_images": None,  # float [N, 3, H, W] in [0, 1]: clean source images for slot 0's descriptor
        "source_descriptor": "pooled",  # "pooled" (every image once) or "ema" (the official: batches of 64, EMA)
    }

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        prefix, vit = find_vit(model)
        depth = len(vit.blocks)
        frozen = self.hparams["diversity_blocks"]
        if not 0 < frozen < depth:
            raise ValueError(f"diversity_blocks must be in 1..{depth - 1} for a ViT with {depth} blocks, got {frozen}")
        if not spectral_layers(model):
            # every target layer of every block (the last blocks need their Vh for the diversity term), through
            # the shared SVD cache: a backbone is decomposed once per machine
            inject(model, cache=default_svd_cache())
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

    def __init__(self, model: nn.Module, record_alignment: bool = False, **overrides: Any) -> None:
        super().__init__(model, record_alignment=record_alignment, **overrides)
        retrieval = self.hparams["retrieval"]
        if retrieval not in (None, "top1", "mix"):
            raise ValueError(f"retrieval must be None, 'top1' or 'mix', got {retrieval!r}")
        if self.hparams["source_descriptor"] not in ("pooled", "ema"):
            raise ValueError(f"source_descriptor must be 'pooled' or 'ema', got {self.hparams['source_descriptor']!r}")
        # keyed as every code is (relative to the ViT, ``get_code``): the bank mixes it with the codes it stores
        self.source_code = {name: layer.S0.detach().clone() for name, layer in code_layers(self.model).items()}
        self.source_descriptor: Descriptor | None = None
        self.bank_note = ""
        self.detector_shifts = 0  # domains ended so far (labels the stored entries)
        if retrieval:
            images = self.hparams["source_images"]
            if images is None:
                self.bank_note = "no source images: the bank starts empty (slot 0 is the first domain stored)"
                warnings.warn(f"IMSE retrieval: {self.bank_note}", stacklevel=3)
            else:
                self.source_descriptor = self._descriptor_of(images)
        self._new_bank()

    def _descriptor_of(self, images: torch.Tensor, chunk: int = 256) -> Descriptor:
        """Pooled per-channel mean/variance of the patch tokens of all source images (every image counts
        once, unlike an EMA over batches that would favour the last ones); ``source_descriptor="ema"`` does what
        the official code does instead: the shift detector's EMA over batches of ``batch_size``, in order, short
        batches skipped."""
        device = next(self.model.parameters()).device
        if self.hparams["source_descriptor"] == "ema":
            size = self.hparams["batch_size"]
            detector = ShiftDetector(momentum=self.hparams["descriptor_momentum"], full_batch=size)
            for start in range(0, len(images), size):
                batch = images[start : start + size].to(device)
                detector.update(batch_descriptor(patch_tokens(self.model, batch)), len(batch))
            if detector.current is None:
                raise ValueError(f"source_descriptor='ema' needs at least {size} source images")
            return detector.current
        total, squares, count = None, None, 0
        for start in range(0, len(images), chunk):
            tokens = patch_tokens(self.model, images[start : start + chunk].to(device)).float()
            flat = tokens.reshape(-1, tokens.shape[-1]).double()
            total = flat.sum(0) if total is None else total + flat.sum(0)
            squares = (flat**2).sum(0) if squares is None else squares + (flat**2).sum(0)
            count += flat.shape[0]
        mean = total / count
        var = (squares - count * mean**2) / (count - 1)
        return Descriptor(mean.float(), var.float())

    def _new_bank(self) -> None:
        self.detector = ShiftDetector(
            self.hparams["shift_threshold"], self.hparams["descriptor_momentum"], self.hparams["batch_size"]
        )
        self.bank = DomainBank(capacity=self.hparams["bank_capacity"])
        if self.source_descriptor is not None:
            self.bank.set_source(self.source_descriptor, self.source_code)

    def reset_state(self) -> None:
        self._new_bank()

    def _retrieve(self, x: torch.Tensor) -> dict[str, Any]:
        """Shift detection and code retrieval, before adapting on the batch (as the official code does)."""
        descriptor = batch_descriptor(patch_tokens(self.model, x))
        score, shift, ended = self.detector.observe(descriptor, x.shape[0])
        stored = retrieved = weights = None
        if shift:
            stored = self.bank.store(
                ended,
                get_code(self.model),
                copy.deepcopy(self.optimizer.state_dict()),
                label=f"domain {self.detector_shifts + 1}",
            )
            self.detector_shifts += 1
        distances = self.bank.distances(descriptor) if len(self.bank) else torch.zeros(0)
        if shift:
            if self.hparams["retrieval"] == "top1":
                retrieved = int(distances.argmin())
                set_code(self.model, self.bank.entries[retrieved].code)
            else:
                code, mixing, _ = self.bank.mix(descriptor, self.source_code, self.hparams["mix_temperature"])
                set_code(self.model, code)
                retrieved, weights = "mix", mixing.tolist()
            self.optimizer.load_state_dict(copy.deepcopy(self._initial_optimizer))  # fresh Adam for the new domain
        return {
            "shift_score": score,
            "shift_detected": shift,
            "stored_slot": stored,
            "retrieved_slot": retrieved,
            "slot_distances": distances.tolist(),
            "mix_weights": weights,
            "bank_size": len(self.bank),
        }

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        events = self._retrieve(x) if self.hparams["retrieval"] else {}
        logits, record = super().step(x)
        record.update(events)
        return logits, record

    def reset(self) -> None:
        super().reset()
        self.detector_shifts = 0

    def bank_identity(self) -> dict[str, Any]:
        """What a saved bank must match: the backbone and the code layout (names and ranks)."""
        layers = spectral_layers(self.model)
        return {
            "backbone": getattr(self.model, "name", type(self.model).__name__),
            "code_layout": {name: int(layer.rank) for name, layer in layers.items()},
            "source_s0_sum": round(float(sum(float(layer.S0.double().sum()) for layer in layers.values())), 3),
        }

    def save_bank(self, path) -> None:
        self.bank.save(path, self.bank_identity())

    def load_bank(self, path) -> None:
        """Replace the bank by a saved one; a corrupted or mismatched file raises and leaves the bank as it was."""
        bank = DomainBank.load(path, self.bank_identity())
        for entry in bank.entries:  # banks saved before codes were portable key them by the wrapper's names
            entry.code = relative_code(self.model, entry.code)
        self.bank = bank

    def diversity(self, stats: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.diversity_layers:
            return None
        return diversity_loss(
            [stats[name] for name in self.diversity_layers],
            num_blocks=self.hparams["diversity_blocks"],
            ratio=self.hparams["diversity_ratio"],
        )

    def build_optimizer(self, params: list[nn.Parameter]) -> SAM:
        base = Adam(  # torch's Adam (imse.core.optim: no CUDA query for CPU parameters)
            params, lr=self.hparams["lr"], betas=tuple(self.hparams["betas"]), weight_decay=self.hparams["weight_decay"]
        )
        return self.wrap_optimizer(base)
