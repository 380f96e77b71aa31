"""What a precision costs in accuracy, and the rule that picks the precision a GPU run uses.

The accuracy: ``python -m imse bench``'s built-in continual stream (the only backbone with trained weights offline)
through the same methods in fp32 and in each other precision, on the same corrupted batches, over several seeds.
The rule (issue 37): the fastest precision whose accuracy stays within ``TOLERANCE_POINTS`` of fp32's, the
difference averaged over the seeds, for every method measured; fp32 itself always qualifies, and stays unless
another is at least ``LEAST_GAIN`` cheaper (on a CPU tf32 *is* fp32: their timings differ by noise alone).
"""

from __future__ import annotations

import statistics

import torch

from imse.core.methods.base import PRECISIONS
from imse.perf.timing import check

TOLERANCE_POINTS = 0.3
LEAST_GAIN = 0.05  # what a precision must save per image over fp32 to replace it


def bench_accuracy(
    device: torch.device,
    *,
    methods: tuple[str, ...] = ("source", "tent", "sar", "imse"),
    precisions: tuple[str, ...] = PRECISIONS,
    seeds: tuple[int, ...] = (0, 1, 2),
    stream: dict | None = None,
) -> dict:
    """Mean accuracy of each method in each precision for each seed, and per method and precision the difference
    to fp32 in points (per seed and averaged), held to ``TOLERANCE_POINTS``. ``stream``: ``run_bench``'s stream
    settings (default: the 15 test corruptions x 256 images, severity 5, batch 64)."""
    from imse.runs.bench import run_bench

    stream = {"per_domain": 256, **(stream or {})}
    accuracy: dict[str, dict[str, list[float]]] = {}  # precision -> method -> per seed
    images = 0
    for precision in ("fp32", *(p for p in precisions if p != "fp32")):
        result = run_bench(methods=methods, seeds=seeds, precision=precision, device=str(device), progress=False,
                           collapse=False, **stream)  # fmt: skip
        accuracy[precision] = {m: [s["methods"][m]["mean_accuracy"] for s in result["per_seed"]] for m in methods}
        images = result["per_seed"][0]["methods"][methods[0]]["images"]
    differences = {
        precision: {
            method: [100 * (a - b) for a, b in zip(accuracy[precision][method], accuracy["fp32"][method])]
            for method in methods
        }
        for precision in accuracy
        if precision != "fp32"
    }
    mean = {p: {m: statistics.fmean(d) for m, d in per.items()} for p, per in differences.items()}
    result = {
        "stream": f"built-in continual, {images:,} images a seed, seeds {', '.join(map(str, seeds))}",
        "stream_settings": stream,
        "seeds": list(seeds),
        "methods": list(methods),
        "mean_accuracy": accuracy,
        "difference_points": differences,
        "mean_difference_points": mean,
        "tolerance_points": TOLERANCE_POINTS,
        "within": {p: all(abs(d) <= TOLERANCE_POINTS for d in per.values()) for p, per in mean.items()},
    }
    result["checks"] = [
        check(
            f"{method} accuracy {precision} - fp32 ({result['stream']})",
            f"{100 * statistics.fmean(accuracy[precision][method]):.2f} / "
            f"{100 * statistics.fmean(accuracy['fp32'][method]):.2f} %",
            f"{mean[precision][method]:+.2f} pt",
            f"|mean| <= {TOLERANCE_POINTS} pt",
            abs(mean[precision][method]) <= TOLERANCE_POINTS,
        )
        for precision in mean
        for method in methods
    ]
    return result


def choose_precision(accuracy: dict, method_steps: list[dict], model: str, methods: tuple[str, ...]) -> dict:
    """The precision a GPU run of ``methods`` on ``model`` should use: of those whose accuracy holds
    (``bench_accuracy``'s ``within``; fp32 always), the one whose calls of ``methods`` cost least per image in
    ``method_steps`` (``bench_methods`` results, one per model and precision)."""
    timed = {entry["precision"]: entry for entry in method_steps if entry["model"] == model}
    cost = {p: sum(e["step_s"][m] for m in methods) / e["batch"] for p, e in timed.items()}
    holds = {"fp32": True, **accuracy["within"]}
    if "fp32" not in cost:
        raise ValueError(f"no fp32 step times on {model} to hold the other precisions against")
    gains = [p for p in cost if holds.get(p, False) and cost[p] <= (1 - LEAST_GAIN) * cost["fp32"]]
    chosen = min(gains, key=cost.__getitem__) if gains else "fp32"
    result = {
        "chosen": chosen,
        "rule": f"the fastest precision whose mean accuracy over seeds {accuracy['seeds']} stays within "
        f"{accuracy['tolerance_points']} points of fp32's for every method measured ({', '.join(accuracy['methods'])}),"
        f" if it saves at least {LEAST_GAIN:.0%} per image over fp32",
        "model": model,
        "methods": list(methods),
        "seconds_per_image": cost,
        "accuracy_holds": {p: holds.get(p, False) for p in cost},
    }
    said = ", ".join(f"{p} {1e3 * c:.2f} ms{'' if holds.get(p) else ' (accuracy off)'}" for p, c in cost.items())
    result["checks"] = [
        check(
            f"GPU precision for {' + '.join(methods)} on {model}: per image", said, chosen, "fastest that holds", None
        )
    ]
    return result
