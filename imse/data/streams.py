"""Test streams (the paper's protocols, docs/protocol.md): which domains come in which order, and the corrupted
batches they yield.

A stream takes clean labelled images from a source, corrupts each batch on the stream's device (seeded per
batch, so a run is reproducible and batches do not depend on each other), and tags every batch with its domain
and severity — for metrics only: methods never see them, nor the labels. The draws come from that device's
generator: with the same seed a GPU run sees other draws of the same corruptions than a CPU run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from imse.data.corruptions import corrupt, corruption_names
from imse.data.sources import Source

__all__ = [
    "AS_THEY_ARE",
    "CLEAN",
    "GRADUAL_SEVERITIES",
    "SCENARIOS",
    "Batch",
    "Domain",
    "Stream",
    "domain_sequence",
    "own_domains",
    "resolve_corruptions",
]

SCENARIOS = ("single", "continual", "gradual", "recurring")
CLEAN = "clean"  # a pseudo-corruption: the images as they are (no-shift streams, source-domain checks)
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)


AS_THEY_ARE = 0  # the severity of a user's own domain: its images as they are, named by its folder


@dataclass(frozen=True)
class Domain:
    """A corruption at a severity (``fog``, 5), or a user's own domain as it is (its folder's name, ``AS_THEY_ARE``)."""

    corruption: str
    severity: int

    @property
    def name(self) -> str:
        return self.corruption if self.severity == AS_THEY_ARE else f"{self.corruption}-{self.severity}"


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, H, W], corrupted, on the stream's device
    labels: torch.Tensor  # int64 [B], on the stream's device: for scoring only
    domain: Domain
    domain_index: int  # position in the stream's domain sequence
    batch_index: int  # position in the whole stream
    first_of_domain: bool
    clean: torch.Tensor | None = None  # the uncorrupted images, when the stream keeps them (the app shows them)


def resolve_corruptions(corruptions: str | Sequence[str]) -> tuple[str, ...]:
    """``"test"`` (the 15, ImageNet-C order), ``"validation"`` (the 4 held-out ones), or explicit names (read from
    the corruption registry when asked, so that one registered later streams too)."""
    if corruptions in ("test", "validation"):
        return corruption_names(corruptions)
    names = (corruptions,) if isinstance(corruptions, str) else tuple(corruptions)
    unknown = [n for n in names if n not in (*corruption_names("all"), CLEAN)]
    if unknown or not names:
        raise ValueError(f"unknown corruption(s) {unknown or names}; use 'test', 'validation' or names from both")
    return names


def domain_sequence(
    scenario: str, corruptions: str | Sequence[str] = "test", severity: int = 5, rounds: int = 3
) -> list[Domain]:
    """``single``/``continual``: each corruption once at ``severity``; ``gradual``: each corruption through
    severities 1,2,3,4,5,4,3,2,1 (135 domains for the 15); ``recurring``: ``rounds`` passes of ``continual``."""
    names = resolve_corruptions(corruptions)
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if scenario == "gradual":
        return [Domain(name, s) for name in names for s in GRADUAL_SEVERITIES]
    once = [Domain(name, severity) for name in names]
    if scenario == "recurring":
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        return once * rounds
    return once


def own_domains(names: Sequence[str], scenario: str, rounds: int = 3) -> list[Domain]:
    """A user's own domains as they are, in the given order: once (``single``, ``continual``) or ``rounds`` times
    (``recurring``). ``gradual`` steps through a corruption's severities, which one's own domains do not have."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    if scenario == "gradual":
        raise ValueError(
            "the gradual scenario steps through corruption severities; your images as they are have none: choose "
            "single, continual or recurring, or stream your images through the corruptions"
        )
    once = [Domain(name, AS_THEY_ARE) for name in names]
    return once * rounds if scenario == "recurring" else once


class Stream:
    """Batches of corrupted images, domain after domain.

    Each domain shows the same ``per_domain`` images of the source (a seeded subset, so domain accuracies are
    comparable), in a seeded order of its own. ``pregenerated`` replaces on-the-fly corruption by a source of
    already corrupted images per domain (e.g. ImageNet-C on disk).

    ``domains`` (a user's own, ``own_domains``) replaces the corruptions: each comes from ``pregenerated(domain)``
    and streams ``min(per_domain, its images)`` of them.

    ``order="listed"`` (the paper protocol, as the official code's unshuffled loader): the first ``per_domain``
    images in the source's own order; for ``recurring``, round *r* takes instead the disjoint slice
    ``r·per_domain … (r+1)·per_domain`` of one seeded permutation of the whole source (the official split).
    """

    def __init__(
        self,
        source: Source | None,
        scenario: str = "continual",
        corruptions: str | Sequence[str] = "test",
        *,
        severity: int = 5,
        per_domain: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rounds: int = 3,
        keep_clean: bool = False,
        pregenerated: Callable[[Domain], Source] | None = None,
        order: str = "seeded",
        domains: Sequence[Domain] | None = None,
    ) -> None:
        if batch_size < 1 or per_domain < 1:
            raise ValueError("batch_size and per_domain must be positive")
        if order not in ("seeded", "listed"):
            raise ValueError(f"order must be 'seeded' or 'listed', got {order!r}")
        if source is None and pregenerated is None:
            raise ValueError("a stream needs a source of clean images or a pregenerated one per domain")
        self.source = source
        self.scenario = scenario
        if domains is not None and pregenerated is None:
            raise ValueError("a stream of one's own domains reads each from pregenerated(domain)")
        self.own = domains is not None
        self.domains = list(domains) if self.own else domain_sequence(scenario, corruptions, severity, rounds)
        self.per_domain = per_domain
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.keep_clean = keep_clean
        self.pregenerated = pregenerated
        self.order = order
        self._per_round = len(self.domains) // rounds if scenario == "recurring" else len(self.domains)

    def _indices(self, available: int, domain_index: int) -> list[int]:
        if self.order == "listed":
            return self._listed(available, domain_index)
        count = min(self.per_domain, available) if self.own else self.per_domain
        if count > available:
            raise ValueError(f"per_domain={self.per_domain} but the source has only {available} images")
        subset = torch.randperm(available, generator=torch.Generator().manual_seed(self.seed))[:count]
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 1000 + domain_index + 1))
        return subset[order].tolist()

    def _listed(self, available: int, domain_index: int) -> list[int]:
        if self.scenario != "recurring":
            if self.per_domain > available:
                raise ValueError(f"per_domain={self.per_domain} but the source has only {available} images")
            return list(range(self.per_domain))
        round_ = domain_index // self._per_round
        end = (round_ + 1) * self.per_domain
        if end > available:
            raise ValueError(
                f"{len(self.domains) // self._per_round} disjoint rounds of {self.per_domain} images need {end:,} "
                f"images per domain; the source has {available:,}"
            )
        permutation = torch.randperm(available, generator=torch.Generator().manual_seed(self.seed))
        return permutation[round_ * self.per_domain : end].tolist()

    def batches_per_domain(self) -> int:
        """Batches of a corruption's domain (one's own domains may hold fewer images: ``domain_batches``)."""
        return -(-self.per_domain // self.batch_size)

    def domain_batches(self) -> list[int]:
        """How many batches each domain streams, in order."""
        if not self.own:
            return [self.batches_per_domain()] * len(self.domains)
        sizes = [min(self.per_domain, len(self.pregenerated(domain))) for domain in self.domains]
        return [-(-size // self.batch_size) for size in sizes]

    def __len__(self) -> int:
        return sum(self.domain_batches())

    def __iter__(self) -> Iterator[Batch]:
        batch_index = 0
        for domain_index, domain in enumerate(self.domains):
            source = self.pregenerated(domain) if self.pregenerated else self.source
            indices = self._indices(len(source), domain_index)
            for start in range(0, len(indices), self.batch_size):
                clean, labels = source.load(indices[start : start + self.batch_size])
                clean, labels = clean.to(self.device), labels.to(self.device)
                if self.pregenerated or domain.corruption == CLEAN:  # one's own domains come as they are
                    images = clean
                else:
                    generator = torch.Generator(self.device).manual_seed(
                        (self.seed * 1_000_003 + batch_index) % (2**63 - 1)
                    )
                    images = corrupt(clean, domain.corruption, domain.severity, generator=generator)
                yield Batch(
                    images=images,
                    labels=labels,
                    domain=domain,
                    domain_index=domain_index,
                    batch_index=batch_index,
                    first_of_domain=start == 0,
                    clean=clean if self.keep_clean else None,
                )
                batch_index += 1
