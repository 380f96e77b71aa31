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
from collections.abc import Mapping
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

__all__ = ["format_summary", "format_table", "gains_over_source", "run_bench", "versions"]


def versions() -> dict[str, str]:
    import timm

    return {
        "imse": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def run_bench(
    *,
    backbone: str = BUILTIN,
    weights: str | None = None,
    data: str = "builtin",
    methods: tuple[str, ...] | Mapping[str, tuple[str, dict[str, Any]]] = ("source", "tent", "sar", "imse"),
    scenario: str = "continual",
    severity: int = 5,
    per_domain: int = 1000,
    batch_size: int = 64,
    seeds: tuple[int, ...] = (0,),
    corruptions: str | tuple[str, ...] = "test",
    device: str = "cpu",
    rounds: int = 3,
    lrs: dict[str, float] | None = None,
    checkpoints: Mapping[str, str] | None = None,
    imagenet_c: str | None = None,
    imagenet_val: str | None = None,
    protocol: str | None = None,
    progress: bool = True,
    tuned: bool = True,
    collapse: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready result (``per_seed`` and the aggregate ``methods``).

    Methods start from the backbone's tuned settings (``imse.defaults``; ``tuned=False``: the official ones),
    then ``lrs`` (a sweep file's or ``--lr``'s) and ``checkpoints`` (method -> the file it starts from: ViDA's
    source warm-up), then each spec's own ``@key=value`` overrides. ``collapse``
    adds each method's expert-alignment std in the last blocks (``imse.collapse``) to the result. ``precision``
    (fp32, tf32, bf16: ``imse.core.methods.base``) is every method's, recorded in the config and each setting."""
    if precision not in PRECISIONS:  # before any model or data is loaded
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(methods, Mapping):  # label -> (method, overrides), e.g. a Lab preset's methods
        specs = {label: (name, dict(extra)) for label, (name, extra) in methods.items()}
    else:
        specs = {spec: parse_method(spec) for spec in methods}
    lrs = dict(lrs or {})
    base = for_data(create_backbone(backbone, weights=weights, device=device), data)  # IN-R/A: 200 logits
    protocol = resolve(protocol, imagenet_data=bool(imagenet_c or class_subset(data)))  # imse.runs.protocol
    if imagenet_c:
        source, pregenerated = None, imagenet_c_domains(imagenet_c, protocol, scenario, base.input_size)
    else:
        source, pregenerated = build_source(data, backbone, base.input_size), None
    config = {
        "backbone": backbone,
        "weights": str(weights) if weights else None,
        "data": f"imagenet-c:{imagenet_c}" if imagenet_c else data,
        "methods": list(specs),
        "scenario": scenario,
        "severity": severity,
        "per_domain": per_domain,
        "batch_size": batch_size,
        "seeds": list(seeds),
        "corruptions": corruptions if isinstance(corruptions, str) else list(corruptions),
        "rounds": rounds if scenario == "recurring" else None,
        "device": device,
        "protocol": protocol,
        "precision": precision,
    }
    # the protocol's rules, then a sweep file's or --lr's rate, then a spec's own overrides
    specs = {spec: (n, {**method_overrides(protocol, n, scenario), **extra}) for spec, (n, extra) in specs.items()}
    specs = {s: (n, {**method_rates(n, lrs[n]), **extra} if n in lrs else extra) for s, (n, extra) in specs.items()}
    files = dict(checkpoints or {})
    specs = {s: (n, {"checkpoint": files[n], **extra} if n in files else extra) for s, (n, extra) in specs.items()}
    clean: list[torch.Tensor] = []  # slot 0's source images, loaded once, and only if a method retrieves

    def clean_source() -> torch.Tensor | None:
        if not clean and (imagenet_val or source is not None):
            clean.append(official_source_images(imagenet_val, base.input_size) if imagenet_val else source_images(
                backbone, source))  # fmt: skip
        return clean[0] if clean else None

    meter = None
    if collapse:
        blocks = METHODS["imse"].defaults["diversity_blocks"]
        meter = CollapseMeter(base, blocks=blocks, cache=default_svd_cache())
    per_seed = []
    started = time.perf_counter()
    for seed in seeds:
        torch.manual_seed(seed)
        wrapped = build_methods(base, backbone, specs, batch_size=batch_size, source_images=clean_source, tuned=tuned,
                                precision=precision)  # fmt: skip
        refused = [why for spec, method in wrapped.items() for why in missing_under(protocol, specs[spec][0],
                                                                                     method.hparams)]  # fmt: skip
        if refused:
            raise ValueError("; ".join(refused))
        config["settings"] = {spec: method_settings(method) for spec, method in wrapped.items()}
        config["lr"] = {spec: s["lr"] for spec, s in config["settings"].items() if "lr" in s}
        stream = Stream(
            source,
            scenario=scenario,
            corruptions=corruptions,
            severity=severity,
            per_domain=per_domain,
            batch_size=batch_size,
            seed=seed,
            device=device,
            rounds=rounds,
            pregenerated=pregenerated,
            order="listed" if protocol == "paper" else "seeded",
        )
        summary = summarise(list(run(wrapped, stream, progress=progress, meter=meter)))
        for name, entry in summary.items():
            entry["num_trainable"] = wrapped[name].num_trainable()
            entry["skipped_updates"] = wrapped[name].skipped_updates
        per_seed.append({"seed": seed, "methods": summary})
    return {
        "config": config,
        "versions": versions(),
        "device_name": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor(),
        "seconds": round(time.perf_counter() - started, 1),
        "per_seed": per_seed,
        "methods": _aggregate(per_seed),
    }


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
