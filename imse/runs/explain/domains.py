"""Teach view 4, domains and retrieval: how IMSE tells domains apart and which stored code it brings back.

A batch's descriptor is the per-channel mean and variance of its patch tokens; two descriptors differ by their
symmetric KL, and a batch more than τ away from the current domain starts a new one. Here every corruption at
one severity (and the clean data) gets a descriptor from one batch, their pairwise KL is laid out as a matrix and
as a 2-D map (classical multidimensional scaling of √KL), and a real ``DomainBank`` holding some of them says
which slot a new batch of another corruption would retrieve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from imse.core.bank import Descriptor, DomainBank, batch_descriptor, patch_tokens
from imse.core.spectral import get_code
from imse.data.corruptions import corrupt

__all__ = ["CLEAN", "DomainMap", "Retrieval", "classical_mds", "domain_map", "retrieve"]

CLEAN = "clean"


@dataclass
class DomainMap:
    names: list[str]  # "clean", then the corruptions
    descriptors: dict[str, Descriptor]
    kl: list[list[float]]  # symmetric KL between every pair, names × names
    xy: list[tuple[float, float]]  # a 2-D layout whose distances approximate √KL
    tau: float  # the shift threshold: KL above it is a new domain
    kept: float  # the share of the √KL configuration's spread the 2-D layout keeps (1: exact)


@dataclass
class Retrieval:
    incoming: str
    stored: list[str]  # the bank's slots in order (slot 0: clean, the source code)
    distances: list[float]  # KL from the incoming batch to each slot
    slot: int  # what top-1 retrieval brings back
    shift_from_clean: bool  # would the detector, sitting on clean data, call this batch a new domain?
    map_slot: int  # the slot whose point on the 2-D map is nearest the incoming corruption's point


def classical_mds(dissimilarity: torch.Tensor, dims: int = 2) -> tuple[torch.Tensor, float]:
    """Points whose Euclidean distances best match ``dissimilarity`` (Torgerson's classical scaling: double-
    centre the squared dissimilarities, keep the top eigenvectors scaled by √eigenvalue), and the share of the
    spread they keep: the kept eigenvalues over all positive ones (1 when the dissimilarities are ``dims``-D)."""
    d2 = dissimilarity.double() ** 2
    n = d2.shape[0]
    centring = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gram = -0.5 * centring @ d2 @ centring
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)[:dims]
    positive = values.clamp_min(0)
    kept = float(positive[order].sum() / positive.sum()) if float(positive.sum()) > 0 else 1.0
    return (vectors[:, order] * positive[order].sqrt()).float(), kept


def _descriptor(model: nn.Module, images: torch.Tensor) -> Descriptor:
    return batch_descriptor(patch_tokens(model, images))  # uint8 or float: the one image rule


def domain_map(
    model: nn.Module, images: torch.Tensor, corruptions: list[str], severity: int, *, tau: float, seed: int = 0
) -> DomainMap:
    """Descriptors of ``images`` (one batch, uint8) clean and under each corruption, their KL and a 2-D map."""
    descriptors = {CLEAN: _descriptor(model, images)}
    for index, name in enumerate(corruptions):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        descriptors[name] = _descriptor(model, corrupt(images, name, severity, generator=generator))
    names = list(descriptors)
    kl = torch.tensor([[a.distance(b) for b in descriptors.values()] for a in descriptors.values()])
    xy, kept = classical_mds(kl.clamp_min(0).sqrt())
    return DomainMap(names, descriptors, kl.tolist(), [tuple(p) for p in xy.tolist()], float(tau), kept)


def retrieve(
    model: nn.Module,
    domains: DomainMap,
    stored: list[str],
    incoming: str,
    images: torch.Tensor,
    *,
    severity: int,
    seed: int = 1,
) -> Retrieval:
    """A bank with the clean descriptor in slot 0 and ``stored`` corruptions after it; a *new* batch of
    ``incoming`` (``images``, other images than the map's) asks it which slot to bring back (top-1, as IMSE)."""
    code = get_code(model)  # every slot holds the source code: this view is about which slot, not what is in it
    stored = [name for name in dict.fromkeys(stored) if name != CLEAN]
    bank = DomainBank(capacity=max(2, len(stored) + 1))
    bank.set_source(domains.descriptors[CLEAN], code)
    for name in stored:
        bank.store(domains.descriptors[name], code, None, label=name)
    if incoming == CLEAN:
        batch = images
    else:
        generator = torch.Generator().manual_seed(seed)
        batch = corrupt(images, incoming, severity, generator=generator)
    descriptor = _descriptor(model, batch)
    slot, _, distances = bank.top1(descriptor)
    at = domains.xy[domains.names.index(incoming)]
    on_map = [math.dist(at, domains.xy[domains.names.index(name)]) for name in [CLEAN, *stored]]
    return Retrieval(
        incoming=incoming,
        stored=[CLEAN, *stored],
        distances=distances.tolist(),
        slot=int(slot),
        shift_from_clean=descriptor.distance(domains.descriptors[CLEAN]) > domains.tau,
        map_slot=min(range(len(on_map)), key=on_map.__getitem__),
    )
