"""The live lab behind the app: a generator of display states for a validated ``LabConfig`` (``lab_config``).

No UI here (the app only lays out and wires): ``run_lab`` builds the backbone and the chosen methods, streams the
*same* corrupted batches through all of them (``runner.run``), and keeps a ``LabState`` of plain numbers and
arrays — accuracy curves, domain spans, alignment statistics, singular-value shifts, bank events, the current
batch — from which ``imse.viz`` draws figures. It yields that state at most a few times per second.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from imse.core.bank import ShiftDetector
from imse.core.images import as_float_images
from imse.core.methods import METHODS
from imse.core.methods.base import TTAMethod
from imse.core.spectral import inject, spectral_layers
from imse.core.svd_cache import default_svd_cache
from imse.data.builders import build_source, slot0_source, source_images, stream_parts
from imse.data.models import create_backbone
from imse.data.streams import AS_THEY_ARE, Stream
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import method_choices, run_methods, with_source
from imse.runs.lab_config import MAX_BATCH, MAX_IMAGES, LabConfig, validate
from imse.runs.memory import keep_freed_memory
from imse.runs.runner import build_methods, run_batch, summarise, top_class_share

__all__ = [
    "MAX_BATCH",
    "MAX_IMAGES",
    "LabConfig",
    "LabRun",
    "LabState",
    "build_run",
    "method_name",
    "primary_label",
    "run_lab",
    "validate",
]


@dataclass
class LabState:
    """Everything the panels show, as plain data (no tensors with gradients, no figures)."""

    config: dict
    methods: list[str]
    class_names: list[str]
    layer_names: list[str] = field(default_factory=list)
    batch: int = 0
    total_batches: int = 0
    images: int = 0
    correct: dict[str, list[int]] = field(default_factory=dict)  # per method, cumulative correct after each batch
    seen: list[int] = field(default_factory=list)  # cumulative images after each batch
    labelled: bool = True  # False: a user's images without labels (agreement with Source instead of accuracy)
    reference: str | None = None  # the Source method's label, when Source runs: agreement is measured against it
    agree: dict[str, list[int]] = field(default_factory=dict)  # per method, cumulative answers equal to Source's
    domains: list[dict] = field(default_factory=list)  # {name, start, end} in batch indices
    alignment: list[list[float]] | None = None  # layers × experts (primary method, current batch)
    alignment_source: list[list[float]] | None = None  # same for the frozen model, on the domain's first update
    alignment_source_domain: int | None = None
    shift_rel: list[list[float]] | None = None  # layers × experts: (S − S0)/S0
    shift_history: list[list[float]] = field(default_factory=list)  # per batch: ‖S − S0‖/‖S0‖ per layer
    frozen_layers: list[str] = field(default_factory=list)  # spectral layers whose S the shown method keeps
    expert_std: dict[str, list[float | None]] = field(default_factory=dict)  # per method, per batch: collapse
    top_share: dict[str, list[float]] = field(default_factory=dict)  # per method, per batch: top-class share
    shift_scores: list[float | None] = field(default_factory=list)
    detections: list[int] = field(default_factory=list)
    stored: list[tuple[int, int]] = field(default_factory=list)  # (batch, slot)
    retrieved: list[tuple[int, Any]] = field(default_factory=list)
    bank_size: list[int] = field(default_factory=list)
    thumbnails: dict | None = None
    finished: bool = False
    message: str = ""
    summary: dict | None = None
    seconds: float = 0.0
    records: list = field(default_factory=list, repr=False)  # the runner's records (for the download)
    final_methods: dict = field(default_factory=dict, repr=False)

    def accuracy(self, method: str) -> list[float]:
        return [c / n for c, n in zip(self.correct[method], self.seen)]

    def agreement(self, method: str) -> list[float]:
        """The share of the answers so far equal to Source's (the unadapted model's)."""
        return [a / n for a, n in zip(self.agree.get(method, []), self.seen)]


def method_name(label: str) -> str:
    return method_choices()[label][0]


def primary_label(methods: dict) -> str:
    """The method whose internals the panels show: the first IMSE variant, else the first method."""
    return next((label for label in methods if method_name(label) == "imse"), next(iter(methods)))


@dataclass
class LabRun:
    """What a run is made of: the backbone, its methods (each on its own copy), the stream of corrupted batches,
    and the unadapted backbone with spectral layers (the panels' reference and the collapse meter's bases)."""

    backbone: torch.nn.Module
    methods: dict[str, TTAMethod]
    specs: dict[str, tuple[str, dict]]
    stream: Stream
    frozen: torch.nn.Module
    labelled: bool = True


def build_run(
    config: LabConfig, *, on_download: Callable[[int, int | None, str], None] | None = None, keep_clean: bool = True
) -> LabRun:
    """Build a validated run's parts as Start does (``run_lab`` streams them; ``imse.perf`` times the same methods
    on the same batches alone). ``on_download(done, total, what)`` follows a first download (weights, Imagenette).
    Images without labels (a user's upload) always run Source beside the chosen methods: agreement with it is what
    such a run can report."""
    backbone = create_backbone(config.backbone, device=config.device, on_download=on_download)
    data_progress = None if on_download is None else functools.partial(_imagenette_progress, on_download)
    source = build_source(config.data, config.backbone, backbone.input_size, progress=data_progress)
    validate(config, len(source))
    labelled = source.labelled
    parts = stream_parts(config.data, source, config.upload_streams, config.scenario, config.rounds)
    clean: list[torch.Tensor] = []

    def clean_source() -> torch.Tensor:  # slot 0's images, loaded once and only if a method retrieves
        if not clean:
            clean.append(source_images(config.backbone, slot0_source(parts)))
        return clean[0]

    specs = run_methods(asdict(config))
    specs = specs if labelled else with_source(specs)
    torch.manual_seed(config.seed)  # the methods' random starts (DPAL's prompts), as bench seeds them: reproducible
    methods = build_methods(backbone, config.backbone, specs, batch_size=config.batch_size, source_images=clean_source,
                            precision=config.precision)  # fmt: skip
    frozen = copy.deepcopy(backbone)
    inject(frozen, cache=default_svd_cache())
    stream = Stream(
        **parts,
        scenario=config.scenario,
        corruptions=config.corruptions,
        severity=config.severity,
        per_domain=config.per_domain,
        batch_size=config.batch_size,
        seed=config.seed,
        device=config.device,
        rounds=config.rounds,
        keep_clean=keep_clean,
    )
    return LabRun(backbone, methods, specs, stream, frozen, labelled)


def _imagenette_progress(on_download, done: int, total: int | None) -> None:
    on_download(done, total, "Downloading Imagenette (once; then cached)")


# The app's pace: a panel update after at least this much computing. Each update costs a heatmap snapshot here and
# every panel's figure in the browser; at 1 s the default run's 2 cores spend their time adapting, and the page still
# moves.
UPDATE_INTERVAL = 1.0


def run_lab(
    config: LabConfig,
    *,
    min_interval: float = UPDATE_INTERVAL,
    thumbnails: int = 6,
    time_limit: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_download: Callable[[int, int | None, str], None] | None = None,
) -> Iterator[LabState]:
    """Stream the run, yielding the state after at least ``min_interval`` seconds of computing since the
    caller last got it (and at the end), so drawing updates never takes more than its share.

    Stopping is cooperative and happens between batches: the caller closes the generator, or ``should_stop()``
    turns true (the run ends without a final state: nobody is listening), or the run has taken ``time_limit``
    seconds (it finishes early, with the results so far and a message saying so). ``on_download(done, total,
    what)`` follows a first download (the weights, Imagenette).
    """
    started = time.perf_counter()
    # freed memory stays in the process while the run computes (each step would page-fault its activations in
    # again: ~10 % of an IMSE step on 2 cores); the app hands it back when a run ends (``release_memory``)
    keep_freed_memory()
    parts = build_run(config, on_download=on_download)
    primary = primary_label(parts.methods)
    shown = parts.methods[primary]
    meter = CollapseMeter(parts.frozen, blocks=METHODS["imse"].defaults["diversity_blocks"])
    state = _new_state(config, parts, primary)
    bank = _BankReadout(parts, config)
    pace = _Pace(min_interval)
    out_of_time = False
    for batch in parts.stream:
        # only a batch that ends with an update records the shown method's per-expert statistics (the heatmap's):
        # they cost an extra product per layer
        shown.record_alignment = pace.update_due(state)
        record = pace.timed(run_batch, parts.methods, batch, parts.stream.scenario, meter)
        pace.keep_alignment(record["methods"][primary]["step"])
        state.records.append(record)
        _count_answers(state, record)
        _count_drift(state, shown)
        bank.count(state, record, batch)
        out_of_time = time_limit is not None and time.perf_counter() - started > time_limit
        out_of_time = out_of_time and state.batch < state.total_batches
        update = pace.update_now(state)
        if update or out_of_time:  # this batch's view: heatmaps, thumbnails
            _snapshot(state, record, shown, primary=primary, batch=batch, alignment=pace.alignment,
                      frozen=parts.frozen, thumbnails=thumbnails)  # fmt: skip
        if update:
            state.seconds = time.perf_counter() - started
            yield state
            pace.last_yield = time.perf_counter()  # count compute time only: drawing the update is the caller's time
        if should_stop is not None and should_stop():
            return
        if out_of_time:
            break
    _finish(state, parts.methods, started=started, time_limit=time_limit if out_of_time else None)
    yield state


def _new_state(config: LabConfig, parts: LabRun, primary: str) -> LabState:
    """The state before the first batch: every method's curves empty, and the spectral layers the panels show
    (the shown method's, else the frozen reference's), with those the shown method does not adapt."""
    wrapped = parts.methods
    state = LabState(
        config=asdict(config),
        methods=list(wrapped),
        class_names=list(parts.backbone.class_names),
        layer_names=list(spectral_layers(wrapped[primary].model) or spectral_layers(parts.frozen)),
        total_batches=len(parts.stream),
        labelled=parts.labelled,
        reference=next((label for label, (name, _) in parts.specs.items() if name == "source"), None),
    )
    state.correct = {label: [] for label in wrapped}
    state.agree = {label: [] for label in wrapped} if state.reference else {}
    state.expert_std = {label: [] for label in wrapped}
    state.top_share = {label: [] for label in wrapped}
    trained = {name.removesuffix(".S") for name in wrapped[primary].trainable}
    state.frozen_layers = [name for name in state.layer_names if name not in trained]
    return state


def _finish(state: LabState, methods: dict[str, TTAMethod], *, started: float, time_limit: float | None) -> None:
    """The final state: the summary, and a message saying the run finished, or stopped at ``time_limit`` (given
    only when it did) with results for the images seen so far."""
    state.summary = summarise(state.records, reference=state.reference)
    for label, entry in state.summary.items():
        entry["num_trainable"] = methods[label].num_trainable()
    state.finished = True
    state.seconds = time.perf_counter() - started
    state.message = f"finished: {state.images:,} images in {state.seconds:.1f} s"
    if time_limit is not None:
        state.message = (
            f"stopped at the {time_limit:.0f} s limit per run: {state.images:,} of "
            f"{state.total_batches * state.config['batch_size']:,} images (results below are for those)"
        )
    state.final_methods = methods


@dataclass
class _Pace:
    """The run's pace against the caller's: when the last update went out, how long the last batch took, and the
    shown method's latest per-expert statistics (the heatmap's, kept until the next update draws them)."""

    min_interval: float
    last_yield: float = 0.0  # the first batch shows at once
    batch_seconds: float = 0.0
    alignment: dict | None = None

    def update_due(self, state: LabState) -> bool:
        """Whether the batch about to run will end with an update (judged by the last batch's time)."""
        coming = state.batch + 1 == state.total_batches
        return coming or time.perf_counter() - self.last_yield + self.batch_seconds >= self.min_interval

    def update_now(self, state: LabState) -> bool:
        """Whether the batch just counted ends with an update: the interval has passed, or it was the last."""
        return time.perf_counter() - self.last_yield >= self.min_interval or state.batch == state.total_batches

    def timed(self, work: Callable, *args: Any) -> Any:
        started = time.perf_counter()
        result = work(*args)
        self.batch_seconds = time.perf_counter() - started
        return result

    def keep_alignment(self, step: dict) -> None:
        """Take the statistics out of the record: kept in every record they would pile up (ViT-B: 150 KB a batch)."""
        self.alignment = step.pop("alignment_std", None) or self.alignment


class _BankReadout:
    """The bank panel's numbers: the retrieving method's own events (its shift scores, stored and retrieved slots),
    or, when no method retrieves, an independent detector's scores on the same descriptors."""

    def __init__(self, parts: LabRun, config: LabConfig) -> None:
        self.retrieval = next((label for label, (_, extra) in parts.specs.items() if extra.get("retrieval")), None)
        self.detector = ShiftDetector(config.tau, full_batch=config.batch_size)
        self.frozen = parts.frozen

    @torch.no_grad()
    def count(self, state: LabState, record: dict, batch) -> None:
        index = record["batch_index"]
        if self.retrieval is not None:
            events = record["methods"][self.retrieval]["step"]
            score, shift = events.get("shift_score"), events.get("shift_detected")
            if events.get("stored_slot") is not None:
                state.stored.append((index, events["stored_slot"]))
            if events.get("retrieved_slot") is not None:
                state.retrieved.append((index, events["retrieved_slot"]))
            state.bank_size.append(events.get("bank_size", 0))
        else:
            score, shift, _ = self.detector.watch(self.frozen, batch.images)
            state.bank_size.append(0)
        state.shift_scores.append(score)
        if shift:
            state.detections.append(index)


def _pool(values: torch.Tensor, columns: int = 128, digits: int = 4) -> list[float]:
    """Mean-pool consecutive experts (sorted by singular value, as the SVD orders them) to ≤ ``columns``;
    rounded, since the panels show colours, not 7-digit numbers (and the payload stays small)."""
    values = values.float()
    if values.numel() > columns:
        values = torch.stack([c.mean() for c in torch.tensor_split(values, columns)])
    return [round(v, digits) for v in values.tolist()]


def _count_answers(state: LabState, record: dict) -> None:
    """What a batch adds to the answers' curves: right answers (or, without labels, answers equal to Source's),
    collapse readouts, and the domain it belongs to."""
    index = record["batch_index"]
    state.batch = index + 1
    state.images += record["n"]
    state.seen.append(state.images)
    shared = record["methods"][state.reference]["predictions"] if state.reference else None
    for label, result in record["methods"].items():
        previous = state.correct[label][-1] if state.correct[label] else 0
        state.correct[label].append(previous + (result["correct"] or 0))  # None: no labels (accuracy not shown)
        if shared is not None:
            agreeing = sum(a == b for a, b in zip(result["predictions"], shared))
            state.agree[label].append((state.agree[label][-1] if state.agree[label] else 0) + agreeing)
        stds = result.get("expert_std")
        state.expert_std[label].append(sum(stds) / len(stds) if stds else None)
        state.top_share[label].append(top_class_share(result["predictions"]))
    if not state.domains or state.domains[-1]["index"] != record["domain_index"]:
        state.domains.append({"name": record["domain"], "index": record["domain_index"], "start": index, "end": index})
    state.domains[-1]["end"] = index


@torch.no_grad()
def _count_drift(state: LabState, shown: TTAMethod) -> None:
    """How far the shown method's singular values have moved: ‖S − S0‖/‖S0‖ per layer (a norm ratio: a mean of
    |ΔS/S0| is dominated by the near-zero σ of rank-deficient layers, where it reached 2.2)."""
    spectral = spectral_layers(shown.model)
    if spectral:
        shifts = torch.stack(
            [(layer.S - layer.S0).norm() / layer.S0.norm().clamp_min(1e-12) for layer in spectral.values()]
        )
        state.shift_history.append(shifts.tolist())


@torch.no_grad()
def _snapshot(state, record, method, *, primary, batch, alignment, frozen, thumbnails) -> None:
    """What only the panels of an update need, computed when an update goes out rather than every batch:
    pooled heatmaps, the frozen model's contrast heatmap and the current batch's thumbnails."""
    from imse.core.losses import AlignmentProbe

    if alignment:
        state.alignment = [_pool(alignment[name]) for name in state.layer_names if name in alignment]
    spectral = spectral_layers(method.model)
    if spectral:
        state.shift_rel = [
            _pool(((layer.S - layer.S0) / layer.S0.clamp_min(1e-12)).cpu(), digits=6) for layer in spectral.values()
        ]
    x = as_float_images(batch.images)
    if state.alignment_source_domain != record["domain_index"]:
        # the frozen model's statistics only change with the domain: once per domain, not one more forward pass
        # per update (that pass was a sixth of the default run's time)
        frozen_layers = spectral_layers(frozen)
        with AlignmentProbe(frozen_layers).capture(detached=list(frozen_layers)) as frozen_stats:
            frozen(x)
        state.alignment_source = [_pool(frozen_stats[name]) for name in frozen_layers]
        state.alignment_source_domain = record["domain_index"]
    k = min(thumbnails, len(batch.labels))
    state.thumbnails = {
        "clean": batch.clean[:k].cpu(),
        "corrupted": batch.images[:k].cpu(),
        "labels": batch.labels[:k].tolist(),
        "before": record["methods"][primary]["predictions"][:k],  # step-1 (pre-update) predictions
        "after": method.model(x[:k]).argmax(-1).tolist(),  # the adapted model, after this batch's update
        "domain": record["domain"],
        "as_is": record["severity"] == AS_THEY_ARE,  # one's own domain: the two rows are the same image
    }
