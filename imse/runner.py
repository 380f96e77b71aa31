"""Drive a stream through one or more methods and keep score. The runner never imports a UI.

All methods see the *same* corrupted batches (one stream pass, every batch fed to each method), which makes
comparisons paired. Records are plain dicts; ``summarise`` turns them into per-domain accuracies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .data.streams import Stream
from .methods.base import TTAMethod

__all__ = ["run", "summarise"]


def run(methods: Mapping[str, TTAMethod], stream: Stream, progress: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one record per batch: domain, severity, batch size and, per method, correct count, step record
    and seconds. In the ``single`` scenario every method is reset before each domain."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(stream), desc=f"{stream.scenario} ({', '.join(methods)})", unit="batch")
    for batch in stream:
        if stream.scenario == "single" and batch.first_of_domain and batch.domain_index > 0:
            for method in methods.values():
                method.reset()
        x = batch.images.float().div_(255)
        record: dict[str, Any] = {
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
        if bar is not None:
            bar.update(1)
        yield record
    if bar is not None:
        bar.close()


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: per-domain ``{name, severity, n, accuracy}`` (domains in stream order; a domain seen in
    several rounds of a recurring stream is listed once per round), the mean over domains, images/s."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, result in record["methods"].items():
            entry = out.setdefault(name, {"domains": [], "seconds": 0.0, "images": 0, "_open": {}})
            key = record["domain_index"]
            if key not in entry["_open"]:
                entry["_open"][key] = {
                    "name": record["corruption"],
                    "severity": record["severity"],
                    "n": 0,
                    "correct": 0,
                }
                entry["domains"].append(entry["_open"][key])
            domain = entry["_open"][key]
            domain["n"] += record["n"]
            domain["correct"] += result["correct"]
            entry["seconds"] += result["seconds"]
            entry["images"] += record["n"]
    for entry in out.values():
        entry.pop("_open")
        for domain in entry["domains"]:
            domain["accuracy"] = domain.pop("correct") / domain["n"]
        entry["mean_accuracy"] = sum(d["accuracy"] for d in entry["domains"]) / len(entry["domains"])
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else None
    return out
