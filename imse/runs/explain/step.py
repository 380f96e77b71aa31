"""Teach view 3, IMSE step by step: on each corrupted batch of a stream, which samples pass the entropy filter,
what SAM does to the loss, the objective's two terms (their values and how hard each pulls on σ), which σ have
moved most since the source σ, and the stream's accuracy so far against the unadapted model's.

What the step did is read off the method's own step (its record, its code before and after), never recomputed by
a second implementation. The pull of each term is the one extra computation: the gradient of each term, at the
code the step starts from, from the method's own pieces (its forward, its filter, its ``diversity``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from imse.core.losses import masked_mean, softmax_entropy
from imse.core.methods import create
from imse.core.spectral import code_layers, get_code
from imse.data.corruptions import corrupt

__all__ = ["TINY", "Moved", "Pull", "StepExplorer", "StepReport", "StreamTally"]

TINY = 0.01  # a source σ under 1 % of its layer's largest: its relative change is not shown


def _three_digits(values: torch.Tensor) -> torch.Tensor:
    """``values`` (≥ 0) rounded to 3 significant digits, as the table prints them (0 stays 0)."""
    exponent = torch.floor(torch.log10(values.clamp_min(1e-300))) - 2
    return torch.where(values > 0, torch.round(values / 10**exponent) * 10**exponent, values)


@dataclass
class Moved:
    """One σ: where it started (the source σ, σ^src), where it is now, and what the last step did to it."""

    layer: str
    expert: int  # numbered from 0, largest source σ first (as every Teach view numbers experts)
    source: float  # the source σ (before any adaptation)
    now: float
    last_step: float
    layer_largest: float  # the layer's largest source σ (its expert 0's)
    steps_this_way: int  # of the steps so far, how many moved this σ the way it has moved in total

    @property
    def since_source(self) -> float:
        return self.now - self.source

    @property
    def relative(self) -> float:
        """(σ − σ^src) / σ^src."""
        return self.since_source / self.source if self.source else math.inf

    @property
    def tiny(self) -> bool:
        """A source σ under ``TINY`` of its layer's largest: an expert that carries almost nothing, whose relative
        change says nothing about the model."""
        return self.source < TINY * self.layer_largest


@dataclass
class Pull:
    """How hard each term of the objective pulls on the trained σ: the gradient norm of each, and the cosine
    between the two gradients (−1: straight against each other), at the code a step starts from."""

    entropy: float | None  # ‖∇ mean H over the reliable samples‖ (None: no reliable sample)
    diversity: float | None  # ‖∇ (−λ_dm · L_dm)‖ (None: λ_dm = 0)
    cosine: float | None


BAND_BATCHES = 5  # the fewest per-batch differences whose spread the stream's noise band is drawn from


@dataclass
class StreamTally:
    """Per batch of the stream so far: its size, how many IMSE got right (its pre-update predictions, as every
    accuracy in the Lab is counted) and how many the unadapted model (Source) got right."""

    sizes: list[int] = field(default_factory=list)
    adapted: list[int] = field(default_factory=list)
    source: list[int] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.sizes)

    def accuracy(self, which: str) -> float:
        """``which``: "adapted" or "source"; the share right over the stream so far."""
        return sum(getattr(self, which)) / max(self.images, 1)

    def gain(self) -> tuple[float, float | None]:
        """IMSE's accuracy minus Source's over the stream so far (points), and two standard errors of that
        difference from the per-batch differences (None before ``BAND_BATCHES``: a spread of fewer says little,
        and two tied batches gave a band of width 0 that read as certainty): a gain inside it is noise."""
        gain = 100 * (sum(self.adapted) - sum(self.source)) / max(self.images, 1)
        if len(self.sizes) < BAND_BATCHES:
            return gain, None
        diffs = torch.tensor(
            [(a - s) / n for a, s, n in zip(self.adapted, self.source, self.sizes)], dtype=torch.float64
        )
        return gain, float(200 * diffs.std() / math.sqrt(len(diffs)))

    def last_within_noise(self) -> int | None:
        """The last batch count (from ``BAND_BATCHES`` on) after which the gain was inside its band, or None: a
        verdict read at the end should say when the band last included 0 (reading it after every batch is looking
        many times)."""
        last = None
        for end in range(BAND_BATCHES, len(self.sizes) + 1):
            gain, band = StreamTally(self.sizes[:end], self.adapted[:end], self.source[:end]).gain()
            if abs(gain) <= band:
                last = end
        return last


@dataclass
class StepReport:
    batch: int  # 1-based: steps taken so far, this one included
    batches: int  # batches in the stream (it starts over after the last)
    entropy: list[float]  # per sample, before the update
    margin: float  # E0: samples with entropy below it are reliable
    reliable: list[bool]
    loss: float | None  # the objective at the current code (SAM's first pass)
    loss_perturbed: float | None  # the same objective at the SAM-perturbed code (second pass)
    entropy_term: float | None  # mean entropy of the reliable samples
    diversity: float | None  # L_dm
    lambda_dm: float
    weighted_sum: float | None  # entropy_term − λ_dm · L_dm (equals ``loss``)
    pull: Pull
    lr: float
    largest_step: float  # the largest |change| this step made to any trained σ (Adam: about lr, sometimes more)
    pulls: list[Pull]  # every step's pull so far, this one last
    moved: list[Moved]  # the σ furthest from the source σ, largest |σ − σ_src| (to 3 digits) first
    labels: list[int]
    before: list[int]  # predictions with the code before the step (the method's own pre-update logits)
    after: list[int]  # predictions of the updated model on the same batch
    source: list[int]  # the unadapted model's predictions on the same batch
    stream: StreamTally
    updated: bool
    skip_reason: str | None

    @property
    def changed(self) -> int:
        """Predictions on this batch that the step changed."""
        return sum(b != a for b, a in zip(self.before, self.after))


class StepExplorer:
    """IMSE on a private copy of ``model``, stepping through a stream of corrupted batches of ``images``, one at
    a time; each batch is corrupted when it is reached (seeded by its place in the stream, so a reset or a second
    pass sees the same images), and the unadapted ``model`` (never written) predicts it too."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        corruption: str,
        severity: int,
        *,
        batch_size: int = 64,
        seed: int = 0,
        top: int = 8,
        **settings,
    ) -> None:
        self.source = model
        self.method = create("imse", copy.deepcopy(model), **settings)
        self.images, self.labels = images, labels
        self.corruption, self.severity, self.seed = corruption, severity, seed
        self.batch_size = batch_size
        self.batches = math.ceil(len(images) / batch_size)
        self.top = top
        self.done = 0
        self.tally = StreamTally()
        self.pulls: list[Pull] = []
        self.ups = self.downs = None  # per trained σ: how many steps raised it, how many lowered it

    def reset(self) -> None:
        """Back to the source code and the stream's first batch."""
        self.method.reset()
        self.done = 0
        self.tally = StreamTally()
        self.pulls = []
        self.ups = self.downs = None

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream's batch ``index`` (0-based), corrupted."""
        start = (index % self.batches) * self.batch_size
        clean = self.images[start : start + self.batch_size]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index % self.batches)
        return corrupt(clean, self.corruption, self.severity, generator=generator), self.labels[
            start : start + len(clean)
        ]

    def pull(self, x: torch.Tensor) -> Pull:
        """Each term's gradient over the trained σ at the current code: the method's forward, filter and
        diversity term, differentiated one term at a time (nothing is stepped)."""
        method = self.method
        params = list(method.trainable.values())
        with torch.enable_grad(), method.probe.capture(differentiable=method.diversity_layers) as stats:
            logits = method.run_model(x)
            entropy = softmax_entropy(logits)
            term = masked_mean(entropy, entropy.detach() < method.entropy_margin(logits.shape[-1]))
            reg = method.diversity(stats)
            diversity = None if reg is None or not method.diversity_weight else -method.diversity_weight * reg
            grads = [
                None
                if t is None
                else torch.cat([g.flatten() for g in torch.autograd.grad(t, params, retain_graph=True)])
                for t in (term, diversity)
            ]
        norms = [None if g is None else float(g.norm()) for g in grads]
        cosine = None
        if grads[0] is not None and grads[1] is not None:
            cosine = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))
        return Pull(entropy=norms[0], diversity=norms[1], cosine=cosine)

    def _moved(self, code_before: dict[str, torch.Tensor]) -> tuple[list[Moved], float]:
        """The ``top`` σ furthest from the source σ, by |σ − σ_src| to the 3 digits the table shows, ties in layer
        and expert order (after one step nearly every σ ties at lr); and the largest |change| of this step."""
        layers = code_layers(self.method.model)
        names = [name for name in code_before if layers[name].S.requires_grad]  # the trained σ
        now = torch.cat([layers[name].S.detach() for name in names]).double()
        source = torch.cat([layers[name].S0 for name in names]).double()
        last = now - torch.cat([code_before[name] for name in names]).double()
        largest = torch.cat([layers[name].S0.max().expand(layers[name].rank) for name in names]).double()
        if self.ups is None:
            self.ups, self.downs = torch.zeros_like(now, dtype=torch.long), torch.zeros_like(now, dtype=torch.long)
        self.ups += last > 0
        self.downs += last < 0
        owners = [(name, i) for name in names for i in range(layers[name].rank)]
        shown = _three_digits((now - source).abs())
        order = torch.sort(shown, descending=True, stable=True).indices[: self.top].tolist()
        moved = [
            Moved(*owners[j], float(source[j]), float(now[j]), float(last[j]), float(largest[j]),
                  int(self.ups[j] if now[j] >= source[j] else self.downs[j]))
            for j in order
        ]  # fmt: skip
        return moved, float(last.abs().max())

    def step(self) -> StepReport:
        x, labels = self.batch(self.done)
        code_before = get_code(self.method.model)
        pull = self.pull(x)
        self.pulls.append(pull)
        logits = self.method(x)  # adapts as a side effect; the logits are the pre-update ones
        record = self.method.last_record
        self.done += 1
        with torch.no_grad():
            after = self.method.model(x).argmax(-1)
            source = self.source(x).argmax(-1)
        before = logits.argmax(-1)
        self.tally.sizes.append(len(labels))
        self.tally.adapted.append(int((before.cpu() == labels).sum()))
        self.tally.source.append(int((source.cpu() == labels).sum()))
        entropy = softmax_entropy(logits.float())
        margin = self.method.entropy_margin(logits.shape[-1])
        lambda_dm = float(self.method.hparams["lambda_dm"])
        term, diversity = record.get("entropy_loss"), record.get("diversity")
        weighted = None if term is None else term - lambda_dm * (diversity or 0.0)
        moved, largest_step = self._moved(code_before)
        return StepReport(
            batch=self.done,
            batches=self.batches,
            entropy=entropy.tolist(),
            margin=float(margin),
            reliable=(entropy < margin).tolist(),
            loss=record.get("loss"),
            loss_perturbed=record.get("loss_second"),
            entropy_term=term,
            diversity=diversity,
            lambda_dm=lambda_dm,
            weighted_sum=weighted,
            pull=pull,
            lr=float(self.method.hparams["lr"]),
            largest_step=largest_step,
            pulls=list(self.pulls),
            moved=moved,
            labels=labels.tolist(),
            before=before.tolist(),
            after=after.tolist(),
            source=source.tolist(),
            stream=copy.deepcopy(self.tally),
            updated=bool(record.get("updated")),
            skip_reason=record.get("skip_reason"),
        )
