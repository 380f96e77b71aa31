"""``python -m imse sweep``: choose each method's hyper-parameters on the four validation corruptions only.

Why this protocol: at 500 images per domain and one severity every learning rate of every method scored within
0.3 points (a 500-image domain is ~8 updates), so the old sweep could not choose. Here every candidate sees
``per_domain`` images (default 2,000) of each validation corruption, in a continual stream, at each of several
severities (default 3 and 5), and is scored by its mean accuracy over those streams. All candidates of a stage
run side by side on the *same* batches (paired), and every method gets the same learning-rate grid.

Stage 1: the learning rate, ``default × LR_FACTORS`` (the same grid size for every method; a method's coupled
rates, ViDA's adapters' and DPAL's predictors', move with it at the official ratio). Stage 2, one setting at a
time at the chosen lr (each method's ``sweep_checks``): the entropy margin's class count for the methods that filter
(``None`` = ours, 0.4·ln C; ``1000`` = the official code's 0.4·ln 1000, which keeps every sample of a 10-class
model), and IMSE's λ_dm. A setting leaves its default only when validation shows a significant gain: among the
candidates whose score is within two paired standard errors of the best (per-batch differences on the same
batches), the one closest to the default is kept. The 15 test corruptions are never looked at.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from typing import Any

from imse.core.methods import METHODS, adaptive_methods
from imse.data.models import BUILTIN
from imse.runs.bench import run_bench, versions
from imse.runs.defaults import method_rates

__all__ = [
    "LR_FACTORS",
    "SWEEP_PER_DOMAIN",
    "SWEEP_SEVERITIES",
    "merge_sweeps",
    "plan_sweep",
    "run_sweep",
    "sweep_checks",
]

LR_FACTORS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SWEEP_SEVERITIES = (3, 5)
SWEEP_PER_DOMAIN = 2000


def sweep_checks() -> dict[str, tuple[tuple[str, tuple], ...]]:
    """Stage 2 per adaptive method: (setting, candidate values, the default), tried in this order at the chosen lr
    (each method's own ``sweep_checks``)."""
    return {name: METHODS[name].sweep_checks for name in adaptive_methods()}


def _spec(method: str, settings: dict[str, Any]) -> str:
    """A bench method spec (``imse@lr=0.003:lambda_dm=0.0``); ``None`` values are left out (= the default)."""
    parts = [f"{key}={value}" for key, value in settings.items() if value is not None]
    return method + ("@" + ":".join(parts) if parts else "")


def _stage(
    candidates: dict[Any, str], severities: tuple[int, ...], common: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """Run every candidate spec (and Source) on the same streams. Score = mean accuracy over the severities;
    each candidate also keeps its per-domain accuracies and per-batch correct counts (for paired noise)."""
    specs = ("source", *candidates.values())
    per_severity: dict[str, dict[int, float]] = {spec: {} for spec in specs}
    domains: dict[str, dict[str, float]] = {spec: {} for spec in specs}
    batches: dict[str, list[int]] = {spec: [] for spec in specs}
    images = 0
    for severity in severities:
        result = run_bench(methods=specs, severity=severity, tuned=False, progress=progress, **common)
        for spec in specs:
            entry = result["per_seed"][0]["methods"][spec]
            per_severity[spec][severity] = entry["mean_accuracy"]
            domains[spec].update({f"{d['name']}-{d['severity']}": d["accuracy"] for d in entry["domains"]})
            batches[spec].extend(entry["batch_correct"])
        images += sum(d["n"] for d in result["per_seed"][0]["methods"]["source"]["domains"])
    score = {spec: statistics.fmean(per_severity[spec].values()) for spec in specs}
    best = max(candidates.values(), key=lambda spec: score[spec])
    return {
        "grid": {str(value): score[spec] for value, spec in candidates.items()},
        "per_severity": {str(value): per_severity[spec] for value, spec in candidates.items()},
        "per_domain": {str(value): domains[spec] for value, spec in candidates.items()},
        "noise": {
            str(value): _paired_noise(batches[spec], batches[best], images) for value, spec in candidates.items()
        },
        "source": per_severity["source"],
        "source_per_domain": domains["source"],
    }


def _paired_noise(candidate: list[int], best: list[int], images: int) -> float:
    """Two standard errors of the score difference between a candidate and the best one, from their per-batch
    correct counts on the same batches: the score is the correct count over all ``images`` (the severities'
    streams have equal length), so its difference has standard error ``stdev(Δ per batch) · √batches / images``."""
    differences = [a - b for a, b in zip(candidate, best)]
    if len(differences) < 2 or not any(differences):
        return 0.0
    return 2 * statistics.stdev(differences) * math.sqrt(len(differences)) / images


def _choose(stage: dict[str, Any], default: str, distance) -> str:
    """The candidate to keep: among those whose score is within the paired noise (2 standard errors) of the best
    one, the closest to the default — a setting leaves its default only on a significant validation gain."""
    grid, noise = stage["grid"], stage["noise"]
    top = max(grid.values())
    tied = [key for key in grid if top - grid[key] <= noise[key]]
    return min(tied, key=lambda key: (distance(key, default), -grid[key]))


def run_sweep(
    *,
    backbone: str = BUILTIN,
    weights: str | None = None,
    data: str = "builtin",
    methods: tuple[str, ...] | None = None,
    severities: tuple[int, ...] = SWEEP_SEVERITIES,
    per_domain: int = SWEEP_PER_DOMAIN,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    factors: tuple[float, ...] = LR_FACTORS,
    checks: dict[str, tuple] | None = None,
    progress: bool = True,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sweep's JSON: per method the chosen settings (``chosen``, ``lr``), every stage's grid, run count.
    ``methods``: by default every adaptive one (``adaptive_methods``). ``earlier``: a sweep to add these methods to
    (``merge_sweeps``), its protocol checked before anything runs."""
    methods = adaptive_methods() if methods is None else methods
    checks = sweep_checks() if checks is None else checks
    common = dict(backbone=backbone, weights=weights, data=data, scenario="continual", corruptions="validation",
                  per_domain=per_domain, batch_size=batch_size, seeds=(seed,), device=device)  # fmt: skip
    results: dict[str, Any] = {
        "protocol": {
            "scenario": "continual",
            "corruptions": "validation",
            "severities": list(severities),
            "per_domain": per_domain,
            "batch_size": batch_size,
            "seed": seed,
            "factors": list(factors),
            "checks": {m: [[key, list(values)] for key, values in checks.get(m, ())] for m in methods},
            "score": "mean accuracy over the severities' continual streams of the four validation corruptions",
            "rule": "among candidates within 2 paired standard errors of the best score, the closest to the default",
            "backbone": backbone,
            "data": data,
            "device": device,
        },
        "versions": versions(),
        "methods": {},
    }
    if earlier is not None:
        _check_comparable(earlier["protocol"], results["protocol"])
    run_stage = functools.partial(_stage, severities=severities, common=common, progress=progress)
    for method in methods:
        if method not in adaptive_methods():
            raise ValueError(f"only adaptive methods have settings to tune: {adaptive_methods()}")
        results["methods"][method] = _sweep_method(
            method, run_stage, batch_size=batch_size, factors=factors, checks=checks.get(method, ())
        )
    return results if earlier is None else merge_sweeps(earlier, results)


def plan_sweep(
    methods: tuple[str, ...] | None = None, *, batch_size: int = 64, factors: tuple[float, ...] = LR_FACTORS
) -> dict[str, dict[str, Any]]:
    """What a sweep would run, before it runs (``sweep --dry-run``): per method its learning-rate grid around its
    default and the settings checked after it, with their candidates; ``methods``: by default every adaptive one."""
    methods = adaptive_methods() if methods is None else methods
    plan = {}
    for method in methods:
        if method not in adaptive_methods():
            raise ValueError(f"only adaptive methods have settings to tune: {adaptive_methods()}")
        plan[method] = {"lrs": _lr_grid(method, batch_size, factors), "checks": dict(sweep_checks()[method])}
    return plan


def _lr_grid(method: str, batch_size: int, factors: tuple[float, ...]) -> list[float]:
    """The rates a sweep tries: the method's default rate at this batch size times each factor."""
    cls = METHODS[method]
    base = cls.learning_rate({**cls.defaults, "batch_size": batch_size})
    return [float(f"{base * factor:.3g}") for factor in factors]


def _sweep_method(
    method: str,
    run_stage: Callable[[dict[Any, str]], dict[str, Any]],
    *,
    batch_size: int,
    factors: tuple[float, ...],
    checks: tuple[tuple[str, tuple], ...],
) -> dict[str, Any]:
    """One method's stages: its learning rate on the grid around its default, then each setting of ``checks`` in
    turn at the chosen rate (``run_stage``: every candidate on the same streams, ``_stage``)."""
    cls = METHODS[method]
    base = cls.learning_rate({**cls.defaults, "batch_size": batch_size})
    stage = run_stage({lr: _spec(method, method_rates(method, lr)) for lr in _lr_grid(method, batch_size, factors)})
    label = _choose(stage, str(base), lambda key, d: abs(math.log(float(key) / float(d))))
    chosen: dict[str, Any] = method_rates(method, float(label))
    stages = [{"setting": "lr", **stage, "chosen": chosen["lr"]}]
    for key, values in checks:
        default = cls.defaults[key]  # the method's own: a tie keeps it
        stage = run_stage({value: _spec(method, {**chosen, key: value}) for value in values})
        label = _choose(stage, str(default), lambda k, d: 0 if k == d else 1)
        chosen[key] = next(value for value in values if str(value) == label)
        stages.append({"setting": key, **stage, "chosen": chosen[key]})
    return {
        "lr": chosen["lr"],
        "default_lr": base,
        "chosen": chosen,
        "score": stages[-1]["grid"][str(chosen[stages[-1]["setting"]])],
        "grid": stages[0]["grid"],
        "stages": stages,
        "runs": sum(len(s["grid"]) for s in stages),
    }


# what two sweeps must share for their choices to be comparable (the device and versions may differ: noted per method)
SAME_PROTOCOL = ("scenario", "corruptions", "severities", "per_domain", "batch_size", "seed", "factors", "backbone",
                 "data", "score", "rule")  # fmt: skip


def merge_sweeps(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` with ``later``'s methods added (or replaced): a method added to the library is swept with the
    same protocol and grid as the others without re-running theirs. Refused when the protocols differ; each method
    keeps the device and versions it ran with (``run``). The images are the same only on the same kind of device:
    a stream draws its corruption noise there (CPU and CUDA generators differ; same seed, same distributions)."""
    _check_comparable(earlier["protocol"], later["protocol"])
    merged = {**earlier, "protocol": dict(earlier["protocol"]), "methods": {}}
    for sweep in (earlier, later):
        run = {"device": sweep["protocol"].get("device", "not recorded"), "versions": sweep["versions"]}
        for method, entry in sweep["methods"].items():
            merged["methods"][method] = {"run": run, **entry}
    merged["protocol"]["checks"] = {**earlier["protocol"]["checks"], **later["protocol"]["checks"]}
    merged["protocol"].pop("device", None)  # per method now, in ``run``
    return merged


def _check_comparable(earlier: dict[str, Any], later: dict[str, Any]) -> None:
    differ = [key for key in SAME_PROTOCOL if earlier.get(key) != later.get(key)]
    if differ:
        raise ValueError(f"the sweeps' protocols differ in {', '.join(differ)}: their choices are not comparable")
