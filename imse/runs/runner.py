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
from imse.data.streams import Stream
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import tuned_settings

__all__ = [
    "BatchRecord",
    "MethodResult",
    "bank_summary",
    "build_methods",
    "method_settings",
    "run",
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
        if "batch_size" in METHODS[name.lower()].defaults:  # TENT, SAR (lr scaling), IMSE (a full batch)
            overrides["batch_size"] = batch_size
        if precision is not None:
            overrides["precision"] = precision
        if "lr" in extra:  # an explicit rate replaces the tuned one, whichever form that took
            overrides.pop("base_lr", None)
        if extra.get("retrieval") and source_images is not None and "source_images" not in extra:
            overrides["source_images"] = source_images()
        overrides.update(extra)
        methods[label] = create(name, copy.deepcopy(model), **overrides)
    return methods


def method_settings(method: TTAMethod) -> dict[str, Any]:
    """A method's settings as plain JSON values, with the learning rate it actually uses as ``lr``."""
    settings = {key: value for key, value in method.hparams.items() if key != "source_images"}
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
    if method.optimizer is not None:
        settings["lr"] = float(method.optimizer.param_groups[0]["lr"])
    return settings


class MethodResult(TypedDict, total=False):
    """One method's part of a batch record."""

    correct: int  # right answers among the batch's pre-update predictions
    predictions: list[int]
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
    methods: dict[str, MethodResult]  # by label


def run(
    methods: Mapping[str, TTAMethod],
    stream: Stream,
    progress: bool = False,
    meter: CollapseMeter | None = None,
) -> Iterator[BatchRecord]:
    """Yield one record per batch (``BatchRecord``): domain, severity, batch size and, per method, correct count,
    predictions, step record and seconds. In the ``single`` scenario every method is reset before each domain.
    With a ``meter``, each method's record also holds its per-layer expert-alignment std (``expert_std``, the
    collapse metric) from the forward pass its predictions came from."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(stream), desc=f"{stream.scenario} ({', '.join(methods)})", unit="batch")
    for batch in stream:
        if stream.scenario == "single" and batch.first_of_domain and batch.domain_index > 0:
            for method in methods.values():
                method.reset()
        x = as_float_images(batch.images)  # the stream's uint8 frames, as every entry point reads them
        record: BatchRecord = {
            "batch_index": batch.batch_index,
            "domain": batch.domain.name,
            "corruption": batch.domain.corruption,
            "severity": batch.domain.severity,
            "domain_index": batch.domain_index,
            "n": int(batch.labels.numel()),
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
                "correct": int((predictions == batch.labels).sum()),
                "predictions": predictions.tolist(),
                "seconds": seconds,
                "step": method.last_record,
            }
            if meter is not None:
                record["methods"][name]["expert_std"] = expert_std
        if bar is not None:
            bar.update(1)
        yield record
    if bar is not None:
        bar.close()


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


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: per-domain ``{name, severity, n, accuracy, top_class_share[, expert_std]}`` (domains in
    stream order; a domain seen in several rounds of a recurring stream is listed once per round), the means
    over domains, images/s, the correct count of every batch (paired comparisons need them). ``expert_std`` is
    the mean over the domain's batches of the mean over layers."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, result in record["methods"].items():
            entry = out.setdefault(name, {"domains": [], "seconds": 0.0, "images": 0, "batch_correct": [], "_open": {}})
            entry["batch_correct"].append(result["correct"])
            key = record["domain_index"]
            if key not in entry["_open"]:
                entry["_open"][key] = {
                    "name": record["corruption"],
                    "severity": record["severity"],
                    "n": 0,
                    "correct": 0,
                    "_predictions": [],
                    "_std": [],
                }
                entry["domains"].append(entry["_open"][key])
            domain = entry["_open"][key]
            domain["n"] += record["n"]
            domain["correct"] += result["correct"]
            domain["_predictions"].extend(result["predictions"])
            if result.get("expert_std"):
                domain["_std"].append(sum(result["expert_std"]) / len(result["expert_std"]))
            entry["seconds"] += result["seconds"]
            entry["images"] += record["n"]
    for entry in out.values():
        entry.pop("_open")
        for domain in entry["domains"]:
            domain["accuracy"] = domain.pop("correct") / domain["n"]
            domain["top_class_share"] = top_class_share(domain.pop("_predictions"))
            stds = domain.pop("_std")
            if stds:
                domain["expert_std"] = sum(stds) / len(stds)
        domains = entry["domains"]
        entry["mean_accuracy"] = sum(d["accuracy"] for d in domains) / len(domains)
        entry["mean_top_class_share"] = sum(d["top_class_share"] for d in domains) / len(domains)
        if all("expert_std" in d for d in domains):
            entry["mean_expert_std"] = sum(d["expert_std"] for d in domains) / len(domains)
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else None
    for name, entry in out.items():
        bank = bank_summary(records, name)
        if bank is not None:
            entry["bank"] = bank
    return out
