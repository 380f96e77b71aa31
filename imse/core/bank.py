"""IMSE's continual half: domain descriptors, shift detection, and a bounded bank of adapted spectral codes.

A domain is described by the per-channel mean and variance of the patch tokens right after patch + position
embedding (CLS and other prefix tokens excluded): cheap (no transformer block runs), and untouched by adaptation
since the patch embedding never trains. The current domain's descriptor is an EMA (0.8 old / 0.2 new, full
batches only); a batch whose symmetric Gaussian KL to it exceeds τ = 0.05 starts a new domain. The bank keeps
(descriptor, spectral code, optimizer state) per past domain; on a shift IMSE stores the domain that ended and
retrieves the code of the nearest one (``top1``) or a softmax(−D/T) mix of all of them (``mix``).

Beyond the paper the bank is bounded: past ``capacity`` entries the two closest domains (slot 0, the source,
excepted) merge into one, their codes averaged with their visit counts as weights and their descriptors
moment-matched, so recurring domains fold into the entry they recur to and memory stays fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imse.core.files import save_safetensors_atomic
from imse.core.images import vit_input
from imse.core.spectral import find_vit

__all__ = [
    "DESCRIPTOR_MOMENTUM",
    "SHIFT_THRESHOLD",
    "BankMismatchError",
    "Descriptor",
    "DomainBank",
    "ShiftDetector",
    "batch_descriptor",
    "patch_tokens",
    "symmetric_kl",
]

_BANK_FORMAT = "imse-domain-bank/1"


class BankMismatchError(ValueError):
    """A bank file that is unreadable or was made for another backbone or code layout."""


def symmetric_kl(mu_a: torch.Tensor, var_a: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between diagonal Gaussians, averaged over channels (docs/domain-bank.md):
    ``mean_c[(v_a + (μ_a−μ_b)²)/(2 v_b) + (v_b + (μ_a−μ_b)²)/(2 v_a) − 1]``; 0 for identical statistics."""
    gap = (mu_a - mu_b) ** 2
    return ((var_a + gap) / (2 * var_b) + (var_b + gap) / (2 * var_a) - 1).mean()


@dataclass
class Descriptor:
    mean: torch.Tensor  # [C]
    var: torch.Tensor  # [C], unbiased

    def distance(self, other: Descriptor) -> float:
        return float(symmetric_kl(self.mean, self.var, other.mean, other.var))

    def to(self, device) -> Descriptor:
        return Descriptor(self.mean.to(device), self.var.to(device))


@torch.no_grad()
def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens after patch + position embedding, ``[B, N, C]`` without the CLS/prefix tokens, of images as
    every entry point reads them (``imse.core.images``).

    ``model`` is a ``Backbone`` (its normalisation is applied first, unless switched off) or a bare timm ViT."""
    x = vit_input(model, x)
    _, vit = find_vit(model)
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    tokens = vit.norm_pre(tokens)
    return tokens[:, getattr(vit, "num_prefix_tokens", 1) :]


def batch_descriptor(tokens: torch.Tensor) -> Descriptor:
    """Per-channel mean and unbiased variance over batch × tokens jointly (float32)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    return Descriptor(flat.mean(0), flat.var(0))


# The official shift rule's defaults (cfgs/vit/imse.yaml DSS_K 0.05; method/domain_info.py's EMA 0.8): IMSE's
# settings and every other detector start from these.
SHIFT_THRESHOLD = 0.05
DESCRIPTOR_MOMENTUM = 0.8


class ShiftDetector:
    """The current domain's EMA descriptor and each batch's shift score against it. One rule for everyone: IMSE's
    retrieval, the Lab's bank panel and ``python -m imse shifts`` all detect shifts through ``observe``."""

    def __init__(
        self, threshold: float = SHIFT_THRESHOLD, momentum: float = DESCRIPTOR_MOMENTUM, full_batch: int = 64
    ) -> None:
        self.threshold = threshold
        self.momentum = momentum
        self.full_batch = full_batch
        self.current: Descriptor | None = None

    def score(self, descriptor: Descriptor) -> float | None:
        """Symmetric KL from the batch to the current domain; ``None`` before the domain has a descriptor."""
        return None if self.current is None else descriptor.distance(self.current)

    def is_shift(self, score: float | None) -> bool:
        return score is not None and score > self.threshold

    def update(self, descriptor: Descriptor, batch_size: int) -> None:
        """Fold the batch into the EMA, only for full batches (a short last batch is a noisier estimate)."""
        if batch_size < self.full_batch:
            return
        if self.current is None:
            self.current = Descriptor(descriptor.mean.clone(), descriptor.var.clone())
        else:
            m = self.momentum
            self.current = Descriptor(
                m * self.current.mean + (1 - m) * descriptor.mean, m * self.current.var + (1 - m) * descriptor.var
            )

    def reset(self) -> None:
        self.current = None

    def observe(self, descriptor: Descriptor, batch_size: int) -> tuple[float | None, bool, Descriptor | None]:
        """One batch, the official order: score it against the current domain, decide, and on a shift start a
        new domain from this batch; then fold the batch in. Returns ``(score, shift, ended)``: ``ended`` is the
        descriptor of the domain a shift closed (what the bank stores), else ``None``."""
        score = self.score(descriptor)
        shift = self.is_shift(score)
        ended = self.current if shift else None
        if shift:
            self.reset()
        self.update(descriptor, batch_size)
        return score, shift, ended

    @torch.no_grad()
    def watch(self, model: nn.Module, images: torch.Tensor) -> tuple[float | None, bool, Descriptor | None]:
        """``observe`` on a batch of images, described by ``model``'s patch tokens (``batch_descriptor``)."""
        return self.observe(batch_descriptor(patch_tokens(model, images)), len(images))


@dataclass
class BankEntry:
    descriptor: Descriptor
    code: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    count: int = 1  # how many domain visits this entry holds (merges add up)
    label: str = ""


@dataclass
class DomainBank:
    """Slot 0 is the source domain (code S0, descriptor from clean source images) and is never merged away."""

    capacity: int = 32
    entries: list[BankEntry] = field(default_factory=list)
    has_source: bool = False

    def __post_init__(self) -> None:
        if self.capacity < 2:
            raise ValueError(f"capacity must be at least 2 (the source and one domain), got {self.capacity}")

    def __len__(self) -> int:
        return len(self.entries)

    def set_source(self, descriptor: Descriptor, code: dict[str, torch.Tensor]) -> None:
        entry = BankEntry(descriptor, {k: v.detach().clone() for k, v in code.items()}, None, 1, "source")
        if self.has_source:
            self.entries[0] = entry
        else:
            self.entries.insert(0, entry)
            self.has_source = True

    def store(
        self, descriptor: Descriptor, code: dict[str, torch.Tensor], optimizer_state: dict | None, label: str = ""
    ) -> int:
        """Add a domain; if that exceeds the capacity, merge the two closest non-source entries. Returns the slot
        that now holds the stored domain."""
        entry = BankEntry(
            Descriptor(descriptor.mean.clone(), descriptor.var.clone()),
            {k: v.detach().clone() for k, v in code.items()},
            optimizer_state,
            1,
            label,
        )
        self.entries.append(entry)
        slot = len(self.entries) - 1
        while len(self.entries) > self.capacity:
            slot = self._merge_closest(track=slot)
        return slot

    def _merge_closest(self, track: int) -> int:
        first = 1 if self.has_source else 0
        best = None
        for i in range(first, len(self.entries)):
            for j in range(i + 1, len(self.entries)):
                d = self.entries[i].descriptor.distance(self.entries[j].descriptor)
                if best is None or d < best[0]:
                    best = (d, i, j)
        _, i, j = best
        a, b = self.entries[i], self.entries[j]
        wa, wb = a.count / (a.count + b.count), b.count / (a.count + b.count)
        mean = wa * a.descriptor.mean + wb * b.descriptor.mean
        # moment matching of the two-component mixture: E[x²] − E[x]²
        second = wa * (a.descriptor.var + a.descriptor.mean**2) + wb * (b.descriptor.var + b.descriptor.mean**2)
        merged = BankEntry(
            Descriptor(mean, second - mean**2),
            {k: wa * a.code[k] + wb * b.code[k] for k in a.code},
            None,  # two Adam histories do not average meaningfully; retrieval resets Adam anyway
            a.count + b.count,
            " + ".join(filter(None, (a.label, b.label)))[:200],
        )
        self.entries[i] = merged
        del self.entries[j]
        if track in (i, j):
            return i
        return track - 1 if track > j else track

    def distances(self, descriptor: Descriptor) -> torch.Tensor:
        """Symmetric KL from ``descriptor`` to every slot's descriptor, ``[len(bank)]``, in the descriptors' dtype
        (``mix`` takes its softmax over these)."""
        mean, var = descriptor.mean, descriptor.var
        each = [symmetric_kl(mean, var, e.descriptor.mean, e.descriptor.var) for e in self.entries]
        return torch.stack(each).to(mean.dtype).cpu() if each else torch.zeros(0, dtype=mean.dtype)

    def top1(self, descriptor: Descriptor) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
        distances = self.distances(descriptor)
        slot = int(distances.argmin())
        return slot, self.entries[slot].code, distances

    def mix(
        self, descriptor: Descriptor, source_code: dict[str, torch.Tensor], temperature: float = 1.0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``S = S0 + Σ_k softmax(−D/T)_k (S_k − S0)``; returns (code, weights, distances)."""
        distances = self.distances(descriptor)
        weights = torch.softmax(-distances / temperature, dim=0)
        code = {}
        for name, s0 in source_code.items():
            delta = sum(w * (e.code[name].to(s0) - s0) for w, e in zip(weights.tolist(), self.entries))
            code[name] = s0 + delta
        return code, weights, distances

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, identity: dict[str, Any]) -> Path:
        """Write tensors (descriptors, codes, optimizer tensors) as safetensors with the rest as JSON metadata,
        atomically (temporary file, then rename). ``identity`` (backbone name, code layout) is checked on load."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        slots = []
        for i, entry in enumerate(self.entries):
            tensors[f"{i}/mean"] = entry.descriptor.mean.detach().cpu().contiguous()
            tensors[f"{i}/var"] = entry.descriptor.var.detach().cpu().contiguous()
            for name, value in entry.code.items():
                tensors[f"{i}/code/{name}"] = value.detach().cpu().contiguous()
            optimizer = None
            if entry.optimizer_state is not None:
                optimizer = _flatten_state(entry.optimizer_state, f"{i}/opt", tensors)
            slots.append({"count": entry.count, "label": entry.label, "optimizer": optimizer})
        metadata = {
            "format": _BANK_FORMAT,
            "capacity": str(self.capacity),
            "has_source": json.dumps(self.has_source),
            "slots": json.dumps(slots),
            "identity": json.dumps(identity, sort_keys=True),
        }
        return save_safetensors_atomic(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, identity: dict[str, Any]) -> DomainBank:
        """Read a bank; refuse (``BankMismatchError``) an unreadable file or one made for another identity.
        Returns a new bank: the caller swaps it in only on success, so a failed load touches nothing."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
            if metadata.get("format") != _BANK_FORMAT:
                raise BankMismatchError(f"{path} is not an IMSE domain bank (format {metadata.get('format')!r})")
            saved_identity = json.loads(metadata["identity"])
            slots = json.loads(metadata["slots"])
            capacity = int(metadata["capacity"])
            has_source = json.loads(metadata["has_source"])
        except BankMismatchError:
            raise
        except FileNotFoundError:
            raise
        except Exception as error:
            raise BankMismatchError(f"{path} is not a readable domain bank: {error}") from error
        expected = json.loads(json.dumps(identity, sort_keys=True))
        if saved_identity != expected:
            differing = sorted(
                k for k in set(saved_identity) | set(expected) if saved_identity.get(k) != expected.get(k)
            )
            raise BankMismatchError(f"{path} was made for another model: {', '.join(differing)} differ")
        bank = cls(capacity=capacity, has_source=has_source)
        for i, slot in enumerate(slots):
            prefix = f"{i}/code/"
            code = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            optimizer = _unflatten_state(slot["optimizer"], f"{i}/opt", tensors) if slot["optimizer"] else None
            descriptor = Descriptor(tensors[f"{i}/mean"], tensors[f"{i}/var"])
            bank.entries.append(BankEntry(descriptor, code, optimizer, int(slot["count"]), slot["label"]))
        return bank


def _flatten_state(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of a (nested) optimizer state dict; tensors go into ``tensors`` under path keys."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_flatten_state(k, f"{prefix}/k{i}", tensors), _flatten_state(v, f"{prefix}/{i}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, (list, tuple)):
        return {"__list__": [_flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a bank file")


def _unflatten_state(skeleton: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {
                _unflatten_state(k, prefix, tensors): _unflatten_state(v, prefix, tensors)
                for k, v in skeleton["__dict__"]
            }
        if "__list__" in skeleton:
            return [_unflatten_state(v, prefix, tensors) for v in skeleton["__list__"]]
    return skeleton
