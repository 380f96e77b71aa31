"""``python -m imse bench``: accuracy under a test stream.

A bench run builds the backbone once per seed, gives each method its own copy, streams the same corrupted
batches through all of them (``runner.run``), and reports per-domain accuracy, the mean, trainable values and
throughput — with the full configuration and versions, so a JSON result says how it was made.
Each method starts from the settings the validation sweep chose for the backbone (``imse.defaults``).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imse import __version__
from imse.core.methods import METHODS
from imse.core.methods.base import PRECISIONS
from imse.core.svd_cache import default_svd_cache
from imse.data.builders import build_source, class_subset, for_data, source_images
from imse.data.models import BUILTIN, create_backbone
from imse.data.streams import Stream
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import method_rates, parse_method
from imse.runs.protocol import imagenet_c_domains, method_overrides, missing_under, official_source_images, resolve
from imse.runs.runner import build_methods, method_settings, run, summarise

__all__ = ["BenchSettings", "format_summary", "format_table", "gains_over_source", "run_bench", "versions"]


def versions() -> dict[str, str]:
    import timm

    return {
        "imse": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class BenchSettings:
    """A bench run's settings: ``run_bench``'s keywords, checked and held in one place, so the steps of a run read
    them from one object rather than a score of arguments each.

    Methods start from the backbone's tuned settings (``imse.defaults``; ``tuned=False``: the official ones),
    then ``lrs`` (a sweep file's or ``--lr``'s) and ``checkpoints`` (method -> the file it starts from: ViDA's
    source warm-up), then each spec's own ``@key=value`` overrides. ``collapse`` adds each method's
    expert-alignment std in the last blocks (``imse.collapse``) to the result. ``precision`` (fp32, tf32, bf16:
    ``imse.core.methods.base``) is every method's, recorded in the config and each setting."""

    backbone: str = BUILTIN
    weights: str | None = None
    data: str = "builtin"
    methods: tuple[str, ...] | Mapping[str, tuple[str, dict[str, Any]]] = ("source", "tent", "sar", "imse")
    scenario: str = "continual"
    severity: int = 5
    per_domain: int = 1000
    batch_size: int = 64
    seeds: tuple[int, ...] = (0,)
    corruptions: str | tuple[str, ...] = "test"
    device: str = "cpu"
    rounds: int = 3
    lrs: Mapping[str, float] | None = None
    checkpoints: Mapping[str, str] | None = None
    imagenet_c: str | None = None
    imagenet_val: str | None = None
    protocol: str | None = None
    progress: bool = True
    tuned: bool = True
    collapse: bool = True
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:  # before any model or data is loaded
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def method_specs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """label -> (method, overrides): a mapping as given (e.g. a Lab preset's methods), else each spec parsed."""
        if isinstance(self.methods, Mapping):
            return {label: (name, dict(extra)) for label, (name, extra) in self.methods.items()}
        return {spec: parse_method(spec) for spec in self.methods}

    def config(self, labels: list[str], protocol: str) -> dict[str, Any]:
        """What the result records of how it was made (each seed adds the methods' settings and rates)."""
        corruptions = self.corruptions
        return {
            "backbone": self.backbone,
            "weights": str(self.weights) if self.weights else None,
            "data": f"imagenet-c:{self.imagenet_c}" if self.imagenet_c else self.data,
            "methods": labels,
            "scenario": self.scenario,
            "severity": self.severity,
            "per_domain": self.per_domain,
            "batch_size": self.batch_size,
            "seeds": list(self.seeds),
            "corruptions": corruptions if isinstance(corruptions, str) else list(corruptions),
            "rounds": self.rounds if self.scenario == "recurring" else None,
            "device": self.device,
            "protocol": protocol,
            "precision": self.precision,
        }


@dataclass
class _Shared:
    """What every seed of a run shares, loaded once: the backbone, the protocol, each method's spec with its
    settings layered, the images the streams are cut from, and the collapse meter."""

    base: torch.nn.Module  # the backbone as the data needs it (for_data)
    protocol: str
    specs: dict[str, tuple[str, dict[str, Any]]]
    source: Any  # clean images to corrupt, or None when the corrupted ones are pre-generated (ImageNet-C)
    pregenerated: Any
    clean_source: Callable[[], torch.Tensor | None]
    meter: CollapseMeter | None


def run_bench(**settings: Any) -> dict[str, Any]:
    """Run the benchmark with ``BenchSettings(**settings)``; returns the JSON-ready result (``per_seed`` and the
    aggregate ``methods``)."""
    bench = BenchSettings(**settings)
    specs = bench.method_specs()
    shared = _load_shared(bench, specs)
    config = bench.config(list(specs), shared.protocol)
    per_seed = []
    started = time.perf_counter()
    for seed in bench.seeds:
        per_seed.append({"seed": seed, "methods": _run_seed(bench, shared, seed, config)})
    device = bench.device
    return {
        "config": config,
        "versions": versions(),
        "device_name": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor(),
        "seconds": round(time.perf_counter() - started, 1),
        "per_seed": per_seed,
        "methods": _aggregate(per_seed),
    }


def _load_shared(bench: BenchSettings, specs: dict[str, tuple[str, dict[str, Any]]]) -> _Shared:
    """The backbone, the protocol and the data, loaded once for every seed (in this order: the protocol depends
    on the data, the source images on the backbone's input size)."""
    # for_data: ImageNet-R/A's 200 logits
    base = for_data(create_backbone(bench.backbone, weights=bench.weights, device=bench.device), bench.data)
    protocol = resolve(bench.protocol, imagenet_data=bool(bench.imagenet_c or class_subset(bench.data)))
    if bench.imagenet_c:
        source, pregenerated = None, imagenet_c_domains(bench.imagenet_c, protocol, bench.scenario, base.input_size)
    else:
        source, pregenerated = build_source(bench.data, bench.backbone, base.input_size), None
    specs = _layered(specs, bench, protocol)
    meter = None
    if bench.collapse:
        blocks = METHODS["imse"].defaults["diversity_blocks"]
        meter = CollapseMeter(base, blocks=blocks, cache=default_svd_cache())
    return _Shared(
        base=base,
        protocol=protocol,
        specs=specs,
        source=source,
        pregenerated=pregenerated,
        clean_source=_clean_source(bench, base, source),
        meter=meter,
    )


def _layered(specs: dict[str, tuple[str, dict[str, Any]]], bench: BenchSettings, protocol: str) -> dict:
    """Each method's settings, layered: its spec's own overrides over the protocol's rules, over a sweep file's
    or --lr's rate, over the checkpoint file it starts from."""
    scenario, lrs, files = bench.scenario, dict(bench.lrs or {}), dict(bench.checkpoints or {})
    specs = {spec: (n, {**method_overrides(protocol, n, scenario), **extra}) for spec, (n, extra) in specs.items()}
    specs = {s: (n, {**method_rates(n, lrs[n]), **extra} if n in lrs else extra) for s, (n, extra) in specs.items()}
    return {s: (n, {"checkpoint": files[n], **extra} if n in files else extra) for s, (n, extra) in specs.items()}


def _clean_source(bench: BenchSettings, base: torch.nn.Module, source: Any) -> Callable[[], torch.Tensor | None]:
    """Slot 0's source images, loaded once and only if a method retrieves (most runs never need them)."""
    clean: list[torch.Tensor] = []

    def clean_source() -> torch.Tensor | None:
        if not clean and (bench.imagenet_val or source is not None):
            clean.append(official_source_images(bench.imagenet_val, base.input_size) if bench.imagenet_val else
                         source_images(bench.backbone, source))  # fmt: skip
        return clean[0] if clean else None

    return clean_source


def _run_seed(bench: BenchSettings, shared: _Shared, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """One seed: fresh copies of the methods, one stream through all of them, each method's summary. Records the
    methods' settings and rates in ``config`` (the same for every seed)."""
    torch.manual_seed(seed)
    specs, protocol = shared.specs, shared.protocol
    wrapped = build_methods(shared.base, bench.backbone, specs, batch_size=bench.batch_size,
                            source_images=shared.clean_source, tuned=bench.tuned,
                            precision=bench.precision)  # fmt: skip
    refused = [why for spec, method in wrapped.items() for why in missing_under(protocol, specs[spec][0],
                                                                                 method.hparams)]  # fmt: skip
    if refused:
        raise ValueError("; ".join(refused))
    config["settings"] = {spec: method_settings(method) for spec, method in wrapped.items()}
    config["lr"] = {spec: s["lr"] for spec, s in config["settings"].items() if "lr" in s}
    stream = Stream(
        shared.source,
        scenario=bench.scenario,
        corruptions=bench.corruptions,
        severity=bench.severity,
        per_domain=bench.per_domain,
        batch_size=bench.batch_size,
        seed=seed,
        device=bench.device,
        rounds=bench.rounds,
        pregenerated=shared.pregenerated,
        order="listed" if protocol == "paper" else "seeded",
    )
    summary = summarise(list(run(wrapped, stream, progress=bench.progress, meter=shared.meter)))
    for name, entry in summary.items():
        entry["num_trainable"] = wrapped[name].num_trainable()
        entry["skipped_updates"] = wrapped[name].skipped_updates
    return summary


def _aggregate(per_seed: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in per_seed[0]["methods"]:
        runs = [seed["methods"][name] for seed in per_seed]
        means = [r["mean_accuracy"] for r in runs]
        domains = []
        for i, domain in enumerate(runs[0]["domains"]):
            accuracies = [r["domains"][i]["accuracy"] for r in runs]
            domains.append(
                {
                    "name": domain["name"],
                    "severity": domain["severity"],
                    "n": domain["n"],
                    "accuracy": statistics.fmean(accuracies),
                    "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                }
            )
            for key in ("top_class_share", "expert_std"):
                if all(key in r["domains"][i] for r in runs):
                    domains[-1][key] = statistics.fmean(r["domains"][i][key] for r in runs)
        speeds = [r["images_per_s"] for r in runs if r["images_per_s"]]
        out[name] = {
            "domains": domains,
            "mean_accuracy": statistics.fmean(means),
            "mean_accuracy_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "num_trainable": runs[0]["num_trainable"],
            "images_per_s": statistics.fmean(speeds) if speeds else None,
        }
        if all("bank" in r for r in runs):  # totals over the seeds
            out[name]["bank"] = {key: sum(r["bank"][key] for r in runs) for key in runs[0]["bank"]}
        for key in ("mean_top_class_share", "mean_expert_std"):
            values = [r[key] for r in runs if key in r]
            if len(values) == len(runs):
                out[name][key] = statistics.fmean(values)
                out[name][f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def format_table(result: dict[str, Any], max_columns: int = 16) -> str:
    """Markdown: rows = methods, columns = domains (accuracy %, mean over seeds) + mean ± std over seeds.
    Long streams (gradual: 135 domains) are summarised per corruption so the table stays readable."""
    methods = result["methods"]
    first = next(iter(methods.values()))
    domains = first["domains"]
    if result["config"]["scenario"] == "recurring":
        return _format_rounds(result)
    grouped = len(domains) > max_columns
    if grouped:
        names = list(dict.fromkeys(d["name"] for d in domains))
        headers = [f"{n}" for n in names]
    else:
        headers = [f"{d['name']}-{d['severity']}" for d in domains]
    lines = [
        "| method | " + " | ".join(headers) + " | mean |",
        "|---|" + "---|" * len(headers) + "---|",
    ]
    for name, entry in methods.items():
        if grouped:
            cells = []
            for corruption in headers:
                values = [d["accuracy"] for d in entry["domains"] if d["name"] == corruption]
                cells.append(f"{100 * statistics.fmean(values):.1f}")
        else:
            cells = [f"{100 * d['accuracy']:.1f}" for d in entry["domains"]]
        std = entry["mean_accuracy_std"]
        mean = f"{100 * entry['mean_accuracy']:.1f}" + (f" ± {100 * std:.1f}" if len(result["per_seed"]) > 1 else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    cfg = result["config"]
    lines.append(
        f"\n{cfg['scenario']}, "
        + ("severities 1-5-1" if cfg["scenario"] == "gradual" else f"severity {cfg['severity']}")
        + f", {cfg['per_domain']} images per domain, batch "
        f"{cfg['batch_size']}, seeds {cfg['seeds']}, backbone {cfg['backbone']}, data {cfg['data']}"
        + (" (columns: mean over each corruption's severities)" if grouped else "")
    )
    return "\n".join(lines)


def _source_key(result: dict[str, Any]) -> str | None:
    return next((key for key in result["methods"] if key.lower() == "source"), None)


def gains_over_source(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per method, its mean accuracy minus Source's in each seed, in points (paired: same batches)."""
    source = _source_key(result)
    if source is None:
        return {}
    seeds = result["per_seed"]
    return {
        name: [100 * (s["methods"][name]["mean_accuracy"] - s["methods"][source]["mean_accuracy"]) for s in seeds]
        for name in result["methods"]
        if name != source
    }


def format_summary(result: dict[str, Any]) -> str:
    """Markdown, one row per method: mean accuracy, gain over Source (points, mean ± std of the per-seed paired
    differences), and the collapse readouts — mean expert-alignment std of the last blocks and the share of the
    most-predicted class (mean over domains) — each ± std over seeds — and the values the method adapts."""
    several = len(result["per_seed"]) > 1

    def pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
        return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if several else "")

    gains = gains_over_source(result)
    lines = [
        "| method | accuracy (%) | vs Source (points) | expert-alignment std | most-predicted class (%) | trainable |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in result["methods"].items():
        gain = "–"
        if name in gains:
            values = gains[name]
            gain = pm(statistics.fmean(values), statistics.stdev(values) if several else 0.0, 1.0)
            gain = gain if gain.startswith("-") else "+" + gain
        std = "–"
        if "mean_expert_std" in entry:
            std = pm(entry["mean_expert_std"], entry["mean_expert_std_std"], 1.0, 4)
        share = (
            pm(entry["mean_top_class_share"], entry["mean_top_class_share_std"])
            if "mean_top_class_share" in entry
            else "–"
        )
        trainable = f"{entry['num_trainable']:,}" if "num_trainable" in entry else "–"
        accuracy = pm(entry["mean_accuracy"], entry["mean_accuracy_std"])
        lines.append(f"| {name} | {accuracy} | {gain} | {std} | {share} | {trainable} |")
    for name, entry in result["methods"].items():
        if "bank" in entry:
            b = entry["bank"]
            lines.append(
                f"\n{name}, over {len(result['per_seed'])} seed(s): {b['detections']} detections found "
                f"{b['boundaries_detected']} of {b['boundaries']} domain boundaries; of the retrievals where a code of "
                f"the incoming corruption was stored ({b['retrievals_with_own_code_stored']}), "
                f"{b['retrieved_same_corruption']} brought that code back; the others retrieved another "
                f"corruption's code {b['retrieved_other_corruption']} times, the source's {b['retrieved_source']}."
            )
    return "\n".join(lines)


def _format_rounds(result: dict[str, Any]) -> str:
    """Recurring streams: one column per round (mean accuracy over that round's domains, mean ± std over seeds)."""
    cfg = result["config"]
    rounds = cfg["rounds"]
    per_round = len(next(iter(result["methods"].values()))["domains"]) // rounds
    lines = [
        "| method | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " | mean |",
        "|---|" + "---|" * (rounds + 1),
    ]
    for name in result["methods"]:
        cells = []
        for r in range(rounds):
            values = [
                statistics.fmean(
                    d["accuracy"] for d in seed["methods"][name]["domains"][r * per_round : (r + 1) * per_round]
                )
                for seed in result["per_seed"]
            ]
            std = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{100 * statistics.fmean(values):.1f}{std}")
        entry = result["methods"][name]
        std = f" ± {100 * entry['mean_accuracy_std']:.1f}" if len(result["per_seed"]) > 1 else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * entry['mean_accuracy']:.1f}{std} |")
    lines.append(
        f"\nrecurring, {rounds} rounds x {per_round} domains, severity {cfg['severity']}, {cfg['per_domain']} "
        f"images per domain, batch {cfg['batch_size']}, seeds {cfg['seeds']}, backbone {cfg['backbone']}, "
        f"data {cfg['data']}"
    )
    return "\n".join(lines)


def load_lrs(path: str | None) -> dict[str, float]:
    """Learning rates chosen by a sweep (its JSON), or none."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return {name: float(entry["lr"]) for name, entry in data["methods"].items()}
