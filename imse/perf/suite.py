"""``python -m imse perf --device cuda --suite``: every GPU number the project waits for, in one command, in minutes.

A GPU is lent for minutes at a time, so the suite is prepared here: its sizes are declared (``GPU``; ``SMOKE`` walks
every code path on a CPU in seconds), each piece's cost is counted before anything runs (``suite_costs``: timed
calls and builds x seconds each), the plan with its estimate is printed first, and the pieces run in the order the
numbers are needed (``STAGES``), each written to the JSON and the markdown table as it finishes
(``suite_run``). What the pieces measure is the existing benchmarks' (``steps``, ``methods``, ``memory``,
``data``), with the precision as one more argument, plus the accuracy per precision (``accuracy``), the Lab's
default run (``lab_runs``) and the CUDA tests (``cuda_tests``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from imse.core.methods.base import PRECISIONS
from imse.perf.suite_costs import Costs, model_shape

# The stages, in the order they run: consumers' numbers first (run_cost's per-method costs, the step targets, the
# precision choice), the CUDA tests last with whatever time is left.
STAGES = ("methods", "step", "official", "accuracy", "lab", "merged", "stream", "memory", "tests")


class Skip(Exception):
    """A piece that has nothing to measure in this run (what it needs did not run, or another piece measured it)."""


@dataclass(frozen=True)
class SuiteSizes:
    """How much the suite measures; one place for each size."""

    name: str
    models: tuple[str, ...]  # IMSE vs SAR, the official layer, merged inference (ViT-S/16, ViT-B/16)
    method_models: tuple[str, ...]  # every method's step: the models a run's cost is read for (run_cost)
    batches: tuple[int, ...]  # IMSE vs SAR
    official_batches: tuple[int, ...]
    batch: int  # every method's step, merged inference, the stream, memory
    repeats: int  # timed calls per measurement (medians)
    method_repeats: int
    accuracy_stream: dict  # run_bench's stream settings for the accuracy per precision
    hub_backbone: str  # the Lab's hub backbone (random weights, photos as stand-ins)
    choice_model: str  # the architecture whose step times choose the GPU precision (the hub backbone's)
    budget_s: float
    lab_settings: dict = field(default_factory=dict)  # changes to the Lab's default run (the smoke's are tiny)
    precisions: tuple[str, ...] = PRECISIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    accuracy_methods: tuple[str, ...] = ("source", "tent", "sar", "imse")
    memory_fresh_process: bool | None = None  # None: a fresh process per step on the CPU, this one on CUDA
    memory_precisions: tuple[str, ...] | None = None  # None: every one of ``precisions``
    test_arguments: tuple[str, ...] | None = None  # pytest's; None: the CUDA tests (``cuda_tests``)
    # torch's CPU threads for the run (None: as they are). The smoke's tensors are tiny: one thread computes them as
    # fast, and on cores shared with other processes two threads spinning for each other ran 40-60x slower
    threads: int | None = None


GPU = SuiteSizes(
    name="gpu",
    models=("vit_small_patch16_224", "vit_base_patch16_224"),
    method_models=("builtin", "vit_small_patch16_224", "vit_base_patch16_224"),
    batches=(1, 16, 64),
    official_batches=(1, 64),
    batch=64,
    repeats=5,  # a GPU's step times vary little: medians of 5 (the CPU tables took 5 to 10)
    method_repeats=3,
    accuracy_stream={"per_domain": 256},  # the 15 test corruptions, severity 5, batch 64 (as docs/performance.md)
    hub_backbone="vit_base_patch16_224.augreg_in21k_ft_in1k",
    choice_model="vit_base_patch16_224",
    budget_s=360.0,
)
SMOKE = SuiteSizes(
    name="smoke",
    models=("smoke_vit_s", "smoke_vit_b"),
    method_models=("builtin", "smoke_vit_b"),
    batches=(1, 2),
    official_batches=(1, 2),
    batch=2,
    repeats=1,
    method_repeats=1,
    accuracy_stream={"per_domain": 4, "batch_size": 4, "corruptions": ("fog",)},
    hub_backbone="vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    choice_model="smoke_vit_b",
    budget_s=60.0,
    lab_settings={"corruptions": ("fog",), "per_domain": 2, "batch_size": 2},
    # in this process: on the CPU a fresh interpreter per step (~4 s each, what ``perf --only memory`` does) would
    # take half the minute; here the resident peak then mostly reads 0 (freed memory served the step): a path, no number
    memory_fresh_process=False,
    threads=1,
)


@dataclass
class Piece:
    """One measurement: its stage, where its result goes (``results[key]``, a list when ``many``), its label, what
    it costs (timed calls, builds, estimated seconds) and how to run it (given the results so far)."""

    stage: str
    key: str
    label: str
    run: Callable[[dict], Any]
    estimate_s: float
    calls: int = 0
    builds: int = 0
    many: bool = True


class Planner:
    """Counts each piece's cost as the plan adds it: a model's first use builds it (timm's initialisation) and
    decomposes it cold (the SVD cache is empty on a fresh machine); later uses read the cache."""

    def __init__(self, device: torch.device, sizes: SuiteSizes) -> None:
        self.device, self.sizes, self.costs = device, sizes, Costs(device)
        self.built: set[str] = set()
        self.decomposed: set[str] = set()
        self.pieces: list[Piece] = []

    def setup(self, model: str, injects: int = 1) -> float:
        seconds = 0.0 if model in self.built or model == "builtin" else self.costs.prototype(model)
        self.built.add(model)
        if injects:
            seconds += self.costs.inject(model, cold=model not in self.decomposed)
            seconds += (injects - 1) * self.costs.inject(model, cold=False)
            self.decomposed.add(model)
        return seconds

    def add(self, stage: str, key: str, label: str, run: Callable[[dict], Any], **cost: Any) -> None:
        calls = cost.get("calls", {})  # (model, call, batch) -> how many
        seconds = cost.get("setup", 0.0) + sum(n * self.costs.call(*what) for what, n in calls.items())
        seconds += cost.get("extra", 0.0)
        self.pieces.append(Piece(stage, key, label, run, seconds, sum(calls.values()), cost.get("builds", 1),
                                 cost.get("many", True)))  # fmt: skip


def plan(device: torch.device, sizes: SuiteSizes, stages: tuple[str, ...] = STAGES) -> list[Piece]:
    """The suite's pieces for ``stages``, in order, each with its estimated seconds."""
    from imse.perf import suite_pieces

    planner = Planner(device, sizes)
    for stage in STAGES:
        if stage in stages:
            getattr(suite_pieces, f"add_{stage}")(planner)
    return planner.pieces


def lab_batches(sizes: SuiteSizes, backbone: str) -> tuple[int, int]:
    """(images, batch size) of the Lab's default run of ``backbone`` at these sizes."""
    from imse.runs.defaults import lab_settings
    from imse.runs.lab import LabConfig
    from imse.runs.lab_config import run_images

    config = LabConfig(**{**lab_settings("default", backbone), **sizes.lab_settings})
    return run_images(config), config.batch_size


def architecture(backbone: str) -> str:
    """The timm architecture of a backbone name (the built-in one is its own)."""
    return backbone if backbone == "builtin" else backbone.split(".")[0]


def shape_side(model: str) -> int:
    return model_shape(model).side
