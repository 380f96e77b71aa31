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
from imse.data.builders import (
    build_source,
    class_subset,
    for_data,
    resolve_data,
    slot0_source,
    source_images,
    stream_parts,
    upload_folder,
)
from imse.data.models import BUILTIN, create_backbone
from imse.data.streams import Stream
from imse.data.uploads import AS_IS, load_prepared
from imse.runs.bench_tables import format_summary, format_table, gains_over_source
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import COMPARED, method_rates, parse_method, with_source
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
    methods: tuple[str, ...] | Mapping[str, tuple[str, dict[str, Any]]] = COMPARED
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
    upload_streams: str = AS_IS  # one's own images (--data PATH): as they are, or through the corruptions
    unlabelled: bool = False  # one's own images: ignore their class folders

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
            "upload_streams": self.upload_streams,
        }


@dataclass
class _Shared:
    """What every seed of a run shares, loaded once: the backbone, the protocol, each method's spec with its
    settings layered, the images the streams are cut from, and the collapse meter."""

    base: torch.nn.Module  # the backbone as the data needs it (for_data)
    protocol: str
    data: str  # as build_source names it (one's own folder or zip: upload:<its prepared folder>)
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
    config = bench.config(list(shared.specs), shared.protocol)
    if (folder := upload_folder(shared.data)) is not None:
        upload = load_prepared(folder)
        config["upload"] = {"found": upload.summary(), "domains": upload.domains, "labelled": upload.labelled}
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
    data = bench.data if bench.imagenet_c else resolve_data(bench.data, bench.backbone, labelled=not bench.unlabelled)
    if bench.imagenet_c:
        source, pregenerated = None, imagenet_c_domains(bench.imagenet_c, protocol, bench.scenario, base.input_size)
    else:
        source, pregenerated = build_source(data, bench.backbone, base.input_size), None
    specs = _layered(specs if source is None or source.labelled else with_source(specs), bench, protocol)
    meter = None
    if bench.collapse:
        blocks = METHODS["imse"].defaults["diversity_blocks"]
        meter = CollapseMeter(base, blocks=blocks, cache=default_svd_cache())
    return _Shared(
        base=base,
        protocol=protocol,
        data=data,
        specs=specs,
        source=source,
        pregenerated=pregenerated,
        clean_source=_clean_source(bench, base, _slot0(bench, data, source)),
        meter=meter,
    )


def _layered(specs: dict[str, tuple[str, dict[str, Any]]], bench: BenchSettings, protocol: str) -> dict:
    """Each method's settings, layered (a later layer wins): the checkpoint file it starts from, a sweep file's or
    --lr's rate, the protocol's rules, and its spec's own overrides (``imse@lr=0.01``)."""
    lrs, files = dict(bench.lrs or {}), dict(bench.checkpoints or {})
    layered = {}
    for spec, (name, own) in specs.items():
        checkpoint = {"checkpoint": files[name]} if name in files else {}
        rates = method_rates(name, lrs[name]) if name in lrs else {}
        rules = method_overrides(protocol, name, bench.scenario)
        layered[spec] = (name, {**checkpoint, **rates, **rules, **own})
    return layered


def _slot0(bench: BenchSettings, data: str, source: Any) -> Any:
    """Where slot 0's clean images come from (``slot0_source``): the stream's clean source, or an upload's first
    domain when it streams as it is; none for pre-generated ImageNet-C (``--imagenet-val`` then)."""
    if source is None:
        return None
    return slot0_source(stream_parts(data, source, bench.upload_streams, bench.scenario, bench.rounds))


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
    parts = stream_parts(shared.data, shared.source, bench.upload_streams, bench.scenario, bench.rounds)
    stream = Stream(
        **{"pregenerated": shared.pregenerated, **parts},
        scenario=bench.scenario,
        corruptions=bench.corruptions,
        severity=bench.severity,
        per_domain=bench.per_domain,
        batch_size=bench.batch_size,
        seed=seed,
        device=bench.device,
        rounds=bench.rounds,
        order="listed" if protocol == "paper" else "seeded",
    )
    reference = next((label for label, (name, _) in specs.items() if name == "source"), None)
    records = list(run(wrapped, stream, progress=bench.progress, meter=shared.meter))
    summary = summarise(records, reference=reference)
    for name, entry in summary.items():
        entry["num_trainable"] = wrapped[name].num_trainable()
        entry["skipped_updates"] = wrapped[name].skipped_updates
    return summary


_DOMAIN_KEYS = ("accuracy", "agreement", "confidence", "entropy", "top_class_share", "expert_std")


def _fmean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation over seeds (0 for one seed); None when a value is missing (no labels)."""
    if any(value is None for value in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate_domain(runs: list[dict], i: int) -> dict[str, Any]:
    first = runs[0]["domains"][i]
    domain = {"name": first["name"], "severity": first["severity"], "n": first["n"]}
    for key in _DOMAIN_KEYS:
        if all(key in r["domains"][i] for r in runs):
            domain[key], std = _fmean_std([r["domains"][i][key] for r in runs])
            if key == "accuracy":
                domain["accuracy_std"] = std
    return domain


def _aggregate(per_seed: list[dict]) -> dict[str, dict[str, Any]]:
    """Per method, over the seeds: each domain's means, every ``mean_*`` readout's mean and its std over the seeds,
    the bank's totals, trainable values and speed."""
    out = {}
    for name in per_seed[0]["methods"]:
        runs = [seed["methods"][name] for seed in per_seed]
        speeds = [r["images_per_s"] for r in runs if r["images_per_s"]]
        entry = {
            "domains": [_aggregate_domain(runs, i) for i in range(len(runs[0]["domains"]))],
            "num_trainable": runs[0]["num_trainable"],
            "images_per_s": statistics.fmean(speeds) if speeds else None,
        }
        for key in _DOMAIN_KEYS:
            if all(f"mean_{key}" in r for r in runs):
                entry[f"mean_{key}"], entry[f"mean_{key}_std"] = _fmean_std([r[f"mean_{key}"] for r in runs])
        if all("bank" in r for r in runs):  # totals over the seeds
            entry["bank"] = {key: sum(r["bank"][key] for r in runs) for key in runs[0]["bank"]}
        out[name] = entry
    return out


def load_lrs(path: str | None) -> dict[str, float]:
    """Learning rates chosen by a sweep (its JSON), or none."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return {name: float(entry["lr"]) for name, entry in data["methods"].items()}
