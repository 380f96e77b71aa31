"""Drive a stream through one or more methods and keep score. The runner never imports a UI.

All methods see the *same* corrupted batches (one stream pass, every batch fed to each method), which makes
comparisons paired. Records are plain dicts; ``summarise`` turns them into per-domain accuracies.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypedDict

import torch
from torch import nn

from imse.core.images import as_float_images
from imse.core.methods import METHODS, create
from imse.core.methods.base import StepRecord, TTAMethod
from imse.data.streams import Batch, Stream
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import tuned_settings

__all__ = [
    "BatchRecord",
    "MethodResult",
    "bank_summary",
    "build_methods",
    "method_settings",
    "run",
    "run_batch",
    "summarise",
    "top_class_share",
]


def build_methods(
    model: nn.Module,
    backbone: str,
    specs: Mapping[str, tuple[str, dict[str, Any]]],
    *,
    batch_size: int,
    source_images: Callable[[], torch.Tensor | None] | None = None,
    tuned: bool = True,
    precision: str | None = None,
) -> dict[str, TTAMethod]:
    """The methods of a run, by label, each on its own copy of ``model`` (the CLI, the Lab and the soak all
    build them here). Settings, later ones winning: the backbone's tuned settings (``tuned=False``: the
    official defaults), the stream's batch size (TENT/SAR scale their lr by it), the run's ``precision``
    (``"fp32"``, ``"tf32"`` or ``"bf16"``, every method; None: each method's own, fp32), the spec's own overrides
    (``imse@precision=bf16``). A method that retrieves codes gets ``source_images()`` for its bank's slot 0."""
    methods = {}
    for label, (name, extra) in specs.items():
        overrides: dict[str, Any] = dict(tuned_settings(backbone, name)) if tuned else {}
        if METHODS[name.lower()].takes_batch_size():
            overrides["batch_size"] = batch_size
        if precision is not None:
            overrides["precision"] = precision
        if _explicit_rate(extra):  # it replaces the tuned one, whichever form that took (lr, or base_lr for TENT/SAR)
            overrides.pop("base_lr", None)
        if extra.get("retrieval") and source_images is not None and "source_images" not in extra:
            overrides["source_images"] = source_images()
        overrides.update(extra)
        methods[label] = create(name, copy.deepcopy(model), **overrides)
    return methods


def _explicit_rate(extra: dict[str, Any]) -> bool:
    """Whether a spec sets the learning rate itself (``imse@lr=0.01``, a sweep file's or ``--lr``'s rate)."""
    return "lr" in extra


def method_settings(method: TTAMethod) -> dict[str, Any]:
    """A method's settings as plain JSON values, with the learning rate it actually uses as ``lr``."""
    settings = {key: value for key, value in method.hparams.items() if key != "source_images"}
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
    if method.optimizer is not None:
        settings["lr"] = float(method.optimizer.param_groups[0]["lr"])
    return settings


class MethodResult(TypedDict, total=False):
    """One method's part of a batch record."""

    correct: int | None  # right answers among the batch's pre-update predictions; None: the images have no labels
    predictions: list[int]
    confidence: float  # mean over the batch of the top class's probability
    entropy: float  # mean over the batch of the prediction's entropy (nats)
    seconds: float  # the method's wall time on this batch
    step: StepRecord  # the method's own record of the call
    expert_std: list[float]  # per layer of the last blocks, with a CollapseMeter


class BatchRecord(TypedDict):
    """What ``run`` yields per batch."""

    batch_index: int
    domain: str  # "fog-5"
    corruption: str
    severity: int
    domain_index: int  # position of the domain in the stream (a revisited domain gets a new index)
    n: int  # images in the batch
    labelled: bool  # False: a user's images without classes (no accuracy: agreement, confidence, entropy instead)
    methods: dict[str, MethodResult]  # by label


def run(
    methods: Mapping[str, TTAMethod],
    stream: Stream,
    progress: bool = False,
    meter: CollapseMeter | None = None,
) -> Iterator[BatchRecord]:
    """Yield one record per batch of ``stream`` (``run_batch``), every method fed the same batch."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(stream), desc=f"{stream.scenario} ({', '.join(methods)})", unit="batch")
    for batch in stream:
        yield run_batch(methods, batch, stream.scenario, meter)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def run_batch(
    methods: Mapping[str, TTAMethod], batch: Batch, scenario: str, meter: CollapseMeter | None = None
) -> BatchRecord:
    """One batch through every method: its record (``BatchRecord``): domain, severity, batch size and, per method,
    correct count (None without labels), predictions, confidence and entropy, step record and seconds. In the
    ``single`` scenario every method is reset before each domain. With a ``meter``, each method's record also holds
    its per-layer expert-alignment std (``expert_std``, the collapse metric) from the forward pass its predictions
    came from."""
    if scenario == "single" and batch.first_of_domain and batch.domain_index > 0:
        for method in methods.values():
            method.reset()
    x = as_float_images(batch.images)  # the stream's uint8 frames, as every entry point reads them
    labelled = bool((batch.labels >= 0).all())  # a user's upload without classes is labelled -1 (UNLABELLED)
    record: BatchRecord = {
        "batch_index": batch.batch_index,
        "domain": batch.domain.name,
        "corruption": batch.domain.corruption,
        "severity": batch.domain.severity,
        "domain_index": batch.domain_index,
        "n": int(batch.labels.numel()),
        "labelled": labelled,
        "methods": {},
    }
    for name, method in methods.items():
        started = time.perf_counter()
        measured = meter.measure(method.model, method.probe) if meter is not None else contextlib.nullcontext([])
        with measured as expert_std:
            logits = method(x)
        predictions = logits.argmax(-1)
        if predictions.is_cuda:
            torch.cuda.synchronize(predictions.device)
        seconds = time.perf_counter() - started
        record["methods"][name] = {
            "correct": int((predictions == batch.labels).sum()) if labelled else None,
            "predictions": predictions.tolist(),
            **_certainty(logits),
            "seconds": seconds,
            "step": method.last_record,
        }
        if meter is not None:
            record["methods"][name]["expert_std"] = expert_std
    return record


@torch.no_grad()
def _certainty(logits: torch.Tensor) -> dict[str, float]:
    """What a method's answers say without labels: the mean top-class probability and the mean entropy."""
    log_p = logits.detach().float().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return {"confidence": float(log_p.max(-1).values.exp().mean()), "entropy": float(entropy.mean())}


def top_class_share(predictions: list[int]) -> float:
    """The share of the most frequent prediction: 1/C for balanced answers, 1.0 when a model answers alike."""
    if not predictions:
        return 0.0
    return max(Counter(predictions).values()) / len(predictions)


def bank_summary(records: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """What a retrieving method's bank did, from its step records (``None`` if it keeps no bank): detections,
    how many true domain boundaries they found (within one batch), and what the retrievals brought back — the
    code stored for the same corruption, another corruption's, or the source's (slot 0), and how many of them
    could have found the same corruption's code. A stored slot holds the domain of the batch before its
    detection."""
    if not records or "shift_detected" not in records[0]["methods"][name]["step"]:
        return None
    holds: dict[int, str] = {}  # slot -> corruption whose code it holds
    boundaries = [
        r["batch_index"] for i, r in enumerate(records) if i and r["domain_index"] != records[i - 1]["domain_index"]
    ]
    detections, same, other, source, could = [], 0, 0, 0, 0
    for i, record in enumerate(records):
        step = record["methods"][name]["step"]
        if not step.get("shift_detected"):
            continue
        detections.append(record["batch_index"])
        if step.get("stored_slot") is not None and i:
            holds[step["stored_slot"]] = records[i - 1]["corruption"]
        slot = step.get("retrieved_slot")
        if isinstance(slot, int):
            could += record["corruption"] in holds.values()
            if slot == 0 and 0 not in holds:
                source += 1
            elif holds.get(slot) == record["corruption"]:
                same += 1
            else:
                other += 1
    found = sum(any(abs(d - b) <= 1 for d in detections) for b in boundaries)
    return {
        "detections": len(detections),
        "boundaries": len(boundaries),
        "boundaries_detected": found,
        "retrievals_with_own_code_stored": could,  # a code of the incoming corruption was in the bank
        "retrieved_same_corruption": same,
        "retrieved_other_corruption": other,
        "retrieved_source": source,
    }


class _Tally:
    """One method's counts on one domain while ``summarise`` reads the records."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.entry = {"name": record["corruption"], "severity": record["severity"], "n": 0}
        self.correct: int | None = 0
        self.predictions: list[int] = []
        self.agreeing = 0
        self.confidence = self.entropy = 0.0
        self.stds: list[float] = []

    def add(self, record: dict[str, Any], result: dict[str, Any], reference: list[int] | None) -> None:
        n = record["n"]
        self.entry["n"] += n
        self.correct = None if result["correct"] is None or self.correct is None else self.correct + result["correct"]
        self.predictions.extend(result["predictions"])
        if reference is not None:
            self.agreeing += sum(a == b for a, b in zip(result["predictions"], reference))
        self.confidence += result["confidence"] * n
        self.entropy += result["entropy"] * n
        if result.get("expert_std"):
            self.stds.append(sum(result["expert_std"]) / len(result["expert_std"]))

    def domain(self, with_reference: bool) -> dict[str, Any]:
        """The domain's entry: accuracy (None without labels), agreement with the reference, confidence, entropy,
        top-class share and, when measured, the mean expert-alignment std."""
        n = self.entry["n"]
        entry = {**self.entry, "accuracy": None if self.correct is None else self.correct / n}
        if with_reference:
            entry["agreement"] = self.agreeing / n
        entry.update(confidence=self.confidence / n, entropy=self.entropy / n,
                     top_class_share=top_class_share(self.predictions))  # fmt: skip
        if self.stds:
            entry["expert_std"] = sum(self.stds) / len(self.stds)
        return entry


def _mean(domains: list[dict[str, Any]], key: str) -> float | None:
    values = [domain.get(key) for domain in domains]
    return None if any(v is None for v in values) else sum(values) / len(values)


def summarise(records: list[dict[str, Any]], reference: str | None = None) -> dict[str, dict[str, Any]]:
    """Per method: per-domain ``{name, severity, n, accuracy, [agreement,] confidence, entropy, top_class_share[,
    expert_std]}`` (domains in stream order; a domain seen in several rounds of a recurring stream is listed once
    per round), their means over domains (``mean_accuracy`` …), images/s and every batch's correct count (paired
    comparisons need them). ``accuracy`` is None for images without labels. ``agreement``: the share of answers
    equal to the ``reference`` method's (Source's, the unadapted model), when it ran. ``expert_std`` is the mean
    over the domain's batches of the mean over layers."""
    tallies: dict[str, dict[int, _Tally]] = {}
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        answers = record["methods"]
        shared = answers[reference]["predictions"] if reference in answers else None
        for name, result in answers.items():
            entry = out.setdefault(name, {"seconds": 0.0, "images": 0, "batch_correct": []})
            entry["batch_correct"].append(result["correct"])
            entry["seconds"] += result["seconds"]
            entry["images"] += record["n"]
            per_domain = tallies.setdefault(name, {})
            tally = per_domain.setdefault(record["domain_index"], _Tally(record))
            tally.add(record, result, shared)
    for name, entry in out.items():
        domains = [tally.domain(reference in records[0]["methods"]) for tally in tallies[name].values()]
        entry["domains"] = domains
        for key in ("accuracy", "agreement", "confidence", "entropy", "top_class_share", "expert_std"):
            if all(key in domain for domain in domains):
                entry[f"mean_{key}"] = _mean(domains, key)
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else None
        bank = bank_summary(records, name)
        if bank is not None:
            entry["bank"] = bank
    return out
