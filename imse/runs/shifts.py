"""``python -m imse shifts``: how well the descriptor + τ rule finds domain boundaries, and how often it cries wolf.

The rule does not depend on the adaptation (the descriptor comes from the untrained patch embedding), so it is
measured alone: the same ``ShiftDetector.watch`` that IMSE's retrieval and the Lab's bank panel use, over test
streams with known boundaries and over streams without any shift.
"""

from __future__ import annotations

import statistics
from typing import Any

from imse.core.bank import SHIFT_THRESHOLD, ShiftDetector
from imse.data.builders import build_source
from imse.data.models import BUILTIN, create_backbone
from imse.data.streams import Stream
from imse.runs.bench import versions

__all__ = ["match_boundaries", "run_shift_detection"]


def _detections(model, stream: Stream, threshold: float) -> tuple[list[int], list[int], list[float]]:
    """The batches where the rule saw a shift, the true boundaries (first batch of every domain but the first) and
    every batch's score (0 before the first domain has a descriptor)."""
    detector = ShiftDetector(threshold, full_batch=stream.batch_size)
    found, boundaries, scores = [], [], []
    for batch in stream:
        if batch.first_of_domain and batch.domain_index > 0:
            boundaries.append(batch.batch_index)
        score, shift, _ = detector.watch(model, batch.images)
        scores.append(score if score is not None else 0.0)
        if shift:
            found.append(batch.batch_index)
    return found, boundaries, scores


def match_boundaries(found: list[int], boundaries: list[int]) -> tuple[int, set[int]]:
    """A detection within one batch of a true boundary is a hit, each boundary matched once (the nearest):
    returns (hits, the boundaries left unmatched)."""
    unmatched, hits = set(boundaries), 0
    for detection in found:
        near = [b for b in unmatched if abs(b - detection) <= 1]
        if near:
            unmatched.discard(min(near, key=lambda b: abs(b - detection)))
            hits += 1
    return hits, unmatched


def _scenario(model, source, scenario: str, seeds, threshold: float, **stream_settings: Any) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        stream = Stream(source, scenario, "test", seed=seed, **stream_settings)
        found, boundaries, _ = _detections(model, stream, threshold)
        hits, unmatched = match_boundaries(found, boundaries)
        missed = sorted(stream.domains[b // stream.batches_per_domain()].name for b in unmatched)
        runs.append({"seed": seed, "detections": len(found), "boundaries": len(boundaries),
                     "precision": hits / len(found) if found else 0.0,
                     "recall": (len(boundaries) - len(unmatched)) / len(boundaries) if boundaries else 0.0,
                     "missed": missed})  # fmt: skip
    return {"runs": runs, "precision": statistics.fmean(r["precision"] for r in runs),
            "recall": statistics.fmean(r["recall"] for r in runs)}  # fmt: skip


def _stationary(model, source, name: str, batches: int, threshold: float, **stream_settings: Any) -> dict[str, Any]:
    """One corruption (or clean images) repeated for at least ``batches`` batches: every detection is false."""
    batch_size = stream_settings["batch_size"]
    per_pass = (len(source) // batch_size) * batch_size
    rounds = -(-batches // (per_pass // batch_size))
    stream = Stream(source, "recurring", [name], per_domain=per_pass, seed=0, rounds=rounds, **stream_settings)
    found, _, scores = _detections(model, stream, threshold)
    return {"batches": len(stream), "false_detections": len(found),
            "per_1000_batches": 1000 * len(found) / len(stream), "max_score": max(scores)}  # fmt: skip


def run_shift_detection(
    *,
    backbone: str = BUILTIN,
    weights: str | None = None,
    data: str = "builtin",
    scenarios: tuple[str, ...] = ("continual", "gradual"),
    severity: int = 5,
    per_domain: int = 500,
    gradual_per_domain: int = 128,
    batch_size: int = 64,
    seeds: tuple[int, ...] = (0, 1, 2),
    threshold: float = SHIFT_THRESHOLD,
    stationary_batches: int = 1000,
    stationary: tuple[str, ...] = ("clean", "gaussian_noise"),
    device: str = "cpu",
) -> dict[str, Any]:
    """Precision (hits / detections) and recall (matched boundaries / boundaries) per scenario and seed, and the
    false detections per 1000 batches on streams without a shift."""
    model = create_backbone(backbone, weights=weights, device=device)
    source = build_source(data, backbone, model.input_size)
    config = {"backbone": backbone, "data": data, "severity": severity, "per_domain": per_domain,
              "gradual_per_domain": gradual_per_domain, "batch_size": batch_size, "seeds": list(seeds),
              "threshold": threshold, "stationary_batches": stationary_batches}  # fmt: skip
    common = dict(severity=severity, batch_size=batch_size, device=device)
    result: dict[str, Any] = {"config": config, "versions": versions(), "scenarios": {}, "stationary": {}}
    for scenario in scenarios:
        count = gradual_per_domain if scenario == "gradual" else per_domain
        result["scenarios"][scenario] = _scenario(model, source, scenario, seeds, threshold, per_domain=count,
                                                  **common)  # fmt: skip
    for name in stationary:
        result["stationary"][name] = _stationary(model, source, name, stationary_batches, threshold, **common)
    return result
