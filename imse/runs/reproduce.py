"""``python -m imse reproduce``: the paper's rows under its own protocol, our table beside the paper's numbers.

One *job* is one backbone × dataset × scenario × method × seed, run by ``run_bench`` with ``protocol="paper"``.
Finished jobs are written to the output JSON after each one (atomically), so an interrupted reproduction resumes
where it stopped and never redoes a finished job.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imse.core.files import write_atomic
from imse.core.methods import METHODS
from imse.data.backbones import USER_FILE, paper_backbones
from imse.runs.defaults import COMPARED
from imse.runs.engines import ENGINES, run_in_process, run_on_ray
from imse.runs.protocol import method_overrides, missing_under

__all__ = [
    "PAPER",
    "Job",
    "describe_plan",
    "format_reproduction",
    "method_plan",
    "paper_architectures",
    "plan",
    "reproduce",
]

# the paper's IMSE accuracy (%) where issue 16 quotes it: (backbone, dataset, scenario) -> accuracy
PAPER = {
    ("supervised", "imagenet-c", "single"): 69.0,
    ("mae", "imagenet-c", "single"): 68.3,
    ("clip", "imagenet-c", "single"): 65.5,
    ("supervised", "imagenet-r", "single"): 69.8,
    ("supervised", "imagenet-a", "single"): 54.8,
}
SCENARIOS = {"imagenet-c": ("single", "continual", "gradual", "recurring"), "imagenet-r": ("single",),
             "imagenet-a": ("single",)}  # fmt: skip
RECURRING_ROUNDS = 10  # the official recurring script's RECURRING 10


@dataclass(frozen=True)
class Job:
    backbone: str
    dataset: str
    scenario: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.backbone}/{self.dataset}/{self.scenario}/{self.method}/{self.seed}"


def plan(
    datasets: Sequence[str],
    backbones: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    scenarios: Sequence[str] | None = None,
) -> list[Job]:
    """Every job, in a fixed order (backbone, dataset, scenario, method, seed); only the supervised backbone runs
    the continual, gradual and recurring rows (as in the paper); ``scenarios`` keeps only those rows."""
    jobs = []
    for backbone in backbones:
        for dataset in datasets:
            rows = SCENARIOS[dataset] if backbone == "supervised" else ("single",)
            for scenario in (s for s in rows if scenarios is None or s in scenarios):
                jobs += [Job(backbone, dataset, scenario, m, s) for m in methods for s in seeds]
    return jobs


def _run_job(
    job: Job,
    *,
    roots: Mapping[str, str],
    architecture: str,
    weights: str | None,
    imagenet_val: str | None,
    device: str,
    per_domain: int,
    batch_size: int,
    corruptions: str | tuple = "test",
    checkpoints: Mapping[str, str] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """One run through ``run_bench`` under the paper protocol (in ``precision``: fp32, tf32 or bf16); what the
    table and a resume need from it."""
    from imse.runs.bench import run_bench

    if job.dataset == "imagenet-c":
        data = {"imagenet_c": roots["imagenet-c"], "corruptions": corruptions, "per_domain": per_domain}
    else:
        from imse.data.sources import ImageFolderSource

        root = roots[job.dataset]
        data = {"data": f"{job.dataset}:{root}", "corruptions": ("clean",), "per_domain": len(ImageFolderSource(root))}
    result = run_bench(backbone=architecture, weights=weights, methods=(job.method,), scenario=job.scenario,
                       severity=5, batch_size=batch_size, seeds=(job.seed,), device=device, imagenet_val=imagenet_val,
                       rounds=RECURRING_ROUNDS, protocol="paper", progress=False, collapse=False,
                       checkpoints=checkpoints, precision=precision, **data)  # fmt: skip
    entry = result["per_seed"][0]["methods"][job.method]
    return {"job": asdict(job), "mean_accuracy": entry["mean_accuracy"], "domains": entry["domains"],
            "settings": result["config"]["settings"][job.method], "versions": result["versions"]}  # fmt: skip


def paper_architectures() -> dict[str, str]:
    """The paper's backbones by role (supervised, mae, clip) -> timm architecture with its weight tag: the backbone
    cards that play them (``imse.data.backbones``)."""
    return {role: card.name for role, card in paper_backbones().items()}


def reproduce(
    *,
    roots: Mapping[str, str],
    out: str | Path,
    backbones: Sequence[str] = ("supervised",),
    methods: Sequence[str] = COMPARED,
    seeds: Sequence[int] = (0,),
    scenarios: Sequence[str] | None = None,
    corruptions: str | Sequence[str] = "test",
    architectures: Mapping[str, str] | None = None,
    weights: Mapping[str, str] | None = None,
    imagenet_val: str | None = None,
    device: str = "cpu",
    per_domain: int = 5000,
    batch_size: int = 64,
    run_job: Callable[..., dict[str, Any]] = _run_job,
    engine: str = "local",
    address: str | None = None,
    progress: bool = True,
    checkpoints: Mapping[str, str] | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run every job not yet in ``out`` and return all results. ``roots``: dataset name -> folder (those given
    decide the datasets); ``architectures`` / ``weights`` name a backbone's timm model and local checkpoint (a
    backbone whose card says its weights are the user's, MAE, needs ``weights["mae"]``). ``engine="ray"`` runs the
    jobs as tasks on a Ray cluster (``address``, else a local one; one GPU per task when ``device`` is CUDA) and
    gathers the same JSON. Every method runs in ``precision`` (fp32, tf32, bf16; each run's settings record it)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    architectures = {**paper_architectures(), **(architectures or {})}
    weights = dict(weights or {})
    checkpoints = dict(checkpoints or {})
    _refuse_what_cannot_run(roots, backbones, architectures, weights)
    refused = [why for m in methods for why in missing_under("paper", m, method_plan(m, "continual", checkpoints))]
    if refused:
        raise ValueError("; ".join(refused))
    path = Path(out)
    done: dict[str, Any] = json.loads(path.read_text())["runs"] if path.exists() else {}
    jobs = plan(list(roots), backbones, methods, seeds, scenarios)

    def kwargs(job: Job) -> dict[str, Any]:
        return dict(roots=dict(roots), architecture=architectures[job.backbone], weights=weights.get(job.backbone),
                    imagenet_val=imagenet_val, device=device, per_domain=per_domain, batch_size=batch_size,
                    corruptions=corruptions if isinstance(corruptions, str) else tuple(corruptions),
                    checkpoints=checkpoints, precision=precision)  # fmt: skip

    todo = [job for job in jobs if job.key not in done]
    finished = _run_jobs(todo, run_job, kwargs, engine=engine, address=address, device=device)
    _record_as_they_finish(finished, done, path, bar=(len(jobs), len(jobs) - len(todo)) if progress else None)
    return {"runs": {job.key: done[job.key] for job in jobs}}


def _refuse_what_cannot_run(
    roots: Mapping[str, str], backbones: Sequence[str], architectures: Mapping[str, str], weights: Mapping[str, str]
) -> None:
    """Before any work: unknown backbones, a backbone whose weights only the user has and were not given, unknown
    datasets, missing folders."""
    unknown = [name for name in backbones if name not in architectures]
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}; choose from {', '.join(architectures)}")
    cards = paper_backbones()
    for name in backbones:
        if name in cards and cards[name].weights == USER_FILE and name not in weights:
            raise ValueError(f"the {name.upper()} backbone needs your fine-tuned checkpoint: --weights {name}=<file>")
    for name, root in roots.items():
        if name not in SCENARIOS:
            raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(SCENARIOS)}")
        if not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"no {name} folder at {root}")


def _run_jobs(todo: list[Job], run_job: Callable, kwargs: Callable, *, engine: str, address: str | None, device: str):
    """``(job, result)`` as each job finishes: in this process, or as tasks on Ray (one GPU each on CUDA)."""
    if engine == "ray":
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
        return run_on_ray(todo, run_job, kwargs, address=address, gpus_per_job=gpus)
    return run_in_process(todo, run_job, kwargs)


def _record_as_they_finish(finished, done: dict[str, Any], path: Path, *, bar: tuple[int, int] | None) -> None:
    """Each finished job into ``done`` and the output JSON at once (atomically: an interruption loses no finished
    job); ``bar``: (jobs planned, jobs done before) for a progress bar, or None for none."""
    shown = None
    if bar is not None:
        from tqdm.auto import tqdm

        shown = tqdm(total=bar[0], initial=bar[1], desc="reproduce", unit="run")
    for job, result in finished:
        done[job.key] = result
        write_atomic(path, json.dumps({"runs": done}, indent=1).encode())
        if shown is not None:
            shown.update(1)
    if shown is not None:
        shown.close()


def method_plan(method: str, scenario: str, checkpoints: Mapping[str, str]) -> dict[str, Any]:
    """The settings the paper protocol gives ``method`` in ``scenario`` before a run: its rules and its file."""
    settings = method_overrides("paper", method, scenario)
    if method in checkpoints:
        settings["checkpoint"] = checkpoints[method]
    return settings


_PREPROCESSING = {"backbone": "the backbone's normalisation", "unit": "[0, 1] images, no normalisation"}


def describe_plan(jobs: Sequence[Job], checkpoints: Mapping[str, str], architectures: Mapping[str, str]) -> str:
    """What ``reproduce`` would run, without running it: every run, and per method and scenario what it is fed,
    the file it starts from and its retrieval; a method the protocol would refuse says why."""
    lines = [f"{len(jobs)} runs under --protocol paper (docs/protocol.md):"]
    lines += [f"  {job.key}  ({architectures[job.backbone]})" for job in jobs]
    lines.append("")
    lines.append("| method | scenario | preprocessing | checkpoint | retrieval |")
    lines.append("|---|---|---|---|---|")
    refused = []
    for method, scenario in dict.fromkeys((job.method, job.scenario) for job in jobs):
        settings = method_plan(method, scenario, checkpoints)
        defaults = METHODS[method].defaults
        retrieval = settings.get("retrieval", defaults.get("retrieval")) if "retrieval" in defaults else "–"
        checkpoint = settings.get("checkpoint") or ("required, missing" if "checkpoint" in defaults else "–")
        preprocessing = _PREPROCESSING[settings.get("preprocessing", "backbone")]
        lines.append(f"| {method} | {scenario} | {preprocessing} | {checkpoint} | {retrieval or 'none'} |")
        refused += missing_under("paper", method, settings)
        if settings.get("checkpoint") and not Path(settings["checkpoint"]).expanduser().is_file():
            refused.append(f"{method}'s checkpoint {settings['checkpoint']} is not a file")
    lines += ["", *(f"refused: {why}" for why in dict.fromkeys(refused))] if refused else []
    return "\n".join(lines)


def format_reproduction(result: Mapping[str, Any]) -> str:
    """Markdown: one row per backbone × dataset × scenario, each method's mean accuracy over its seeds (± std when
    several), and the paper's IMSE number where it is quoted."""
    cells: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for run in result["runs"].values():
        job = run["job"]
        row = cells.setdefault((job["backbone"], job["dataset"], job["scenario"]), {})
        row.setdefault(job["method"], []).append(100 * run["mean_accuracy"])
    known = list(METHODS)  # the library's order; a spec outside it (e.g. ``imse@lr=0.001``) after, by name
    methods = sorted({m for row in cells.values() for m in row}, key=lambda m: (known.index(m) if m in known else
                                                                                 len(known), m))  # fmt: skip
    lines = ["| backbone | data | scenario | " + " | ".join(methods) + " | IMSE − best other | paper (IMSE) |"]
    lines.append("|" + "---|" * (len(methods) + 5))
    for (backbone, dataset, scenario), row in cells.items():
        values = []
        for method in methods:
            accs = row.get(method, [])
            spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            values.append(f"{statistics.fmean(accs):.1f}{spread}" if accs else "–")
        others = [statistics.fmean(accs) for method, accs in row.items() if method != "imse"]
        gain = f"{statistics.fmean(row['imse']) - max(others):+.1f}" if "imse" in row and others else "–"
        paper = PAPER.get((backbone, dataset, scenario))
        lines.append(f"| {backbone} | {dataset} | {scenario} | " + " | ".join(values) + f" | {gain} | {paper or '–'} |")
    return "\n".join(lines)
