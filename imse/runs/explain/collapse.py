"""Teach view 2, collapse measured: each expert's alignment std on clean images, on corrupted ones, and as IMSE,
IMSE without its diversity term, SAR and TENT adapt on the corrupted ones — with what each then predicts. SAR adapts
LayerNorm under the filter and SAM that IMSE reuses: against IMSE without its diversity term, it is σ against
LayerNorm under nearly the same update (SAR steps with SGD, IMSE with Adam).

The paper's story is that corruption and entropy minimisation shrink the spread of how inputs align with the
experts (every image starts to look alike to them) and that ``L_dm`` holds it up. This module measures it on the
model in hand and reports what it finds, including layers where the story does not hold.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from imse.core.methods import create
from imse.data.corruptions import corrupt
from imse.runs.collapse import CollapseMeter

__all__ = ["ADAPTED", "COLLAPSE_RISE", "CollapseView", "collapse_progress", "measure_collapse"]

# the adapted conditions: label -> (method, overrides on top of the run's settings)
ADAPTED = {
    "IMSE": ("imse", {}),
    "IMSE, λ_dm = 0": ("imse", {"lambda_dm": 0.0}),
    "SAR": ("sar", {}),
    "TENT": ("tent", {}),
}
UNADAPTED = ("clean", "corrupted")  # the model as it is, on the clean images and on the same images corrupted
# collapse *from adaptation*: a method's top-class share this far above the unadapted model's on the same images
COLLAPSE_RISE = 0.10


@dataclass
class CollapseView:
    layers: list[str]  # the diversity blocks' layers, in order
    conditions: list[str]  # "clean", "corrupted", then the adapted ones (once they have adapted)
    expert_std: dict[str, dict[str, list[float]]]  # condition -> layer -> per-expert std (largest σ first)
    layer_mean: dict[str, list[float]]  # condition -> per layer, mean std of all experts but the largest
    class_counts: dict[str, list[int]]  # condition -> how many images each class was predicted for
    accuracy: dict[str, float]
    right: dict[str, list[bool]] = field(default_factory=dict)  # condition -> was each measured image right?
    lower_when_corrupted: list[str] = field(default_factory=list)  # layers whose mean std drops under corruption
    images_adapted: int = 0  # corrupted images each adapted method has stepped on so far
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # condition -> (images, mean std)
    finished: bool = False

    def mean_std(self, condition: str) -> float:
        """The layer means averaged over layers: one number per condition."""
        values = self.layer_mean[condition]
        return sum(values) / len(values)

    def top_share(self, condition: str) -> float:
        """The share of images given the most-predicted class (1/C when balanced, 1 when collapsed)."""
        counts = self.class_counts[condition]
        return max(counts) / max(sum(counts), 1)

    @property
    def measured(self) -> int:
        """How many images each condition was measured on."""
        return sum(self.class_counts["clean"])

    def correct(self, condition: str) -> int:
        """How many of the measured images ``condition`` got right."""
        return round(self.accuracy[condition] * self.measured)

    def paired(self, condition: str, against: str = "corrupted") -> tuple[int, float]:
        """``condition``'s right answers minus ``against``'s on the same measured images, and two standard errors
        of that difference, both in images: per image the difference is +1, 0 or −1 (one fixed model per
        condition, so the images are the independent units); a difference inside the band is noise."""
        diffs = [int(a) - int(b) for a, b in zip(self.right[condition], self.right[against])]
        n = len(diffs)
        mean = sum(diffs) / n
        variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        return sum(diffs), 2 * math.sqrt(n * variance)

    def beyond_noise(self, condition: str, against: str = "corrupted") -> bool:
        """Whether ``condition`` and ``against`` differ by more than two standard errors of their paired difference."""
        gain, band = self.paired(condition, against)
        return abs(gain) > band

    @property
    def adapted(self) -> list[str]:
        """The adapting methods measured so far."""
        return [condition for condition in self.conditions if condition not in UNADAPTED]

    def collapsed(self) -> list[str]:
        """The methods whose adapting crowded the predictions into one class: a top-class share at least
        ``COLLAPSE_RISE`` above the unadapted model's on the same corrupted images."""
        floor = self.top_share("corrupted") + COLLAPSE_RISE
        return [condition for condition in self.adapted if self.top_share(condition) >= floor - 1e-9]


def _measure(meter: CollapseMeter, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, classes: int):
    stds, logits = meter.expert_stds(model, x)
    predicted = logits.argmax(-1).cpu()
    counts = torch.bincount(predicted, minlength=classes).tolist()
    right = predicted == labels
    return stds, counts, float(right.float().mean()), right.tolist()


def collapse_progress(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    corruption: str,
    severity: int,
    *,
    rounds: int = 8,
    steps_per_round: int = 3,
    batch_size: int = 32,
    measured: int = 128,
    seed: int = 0,
    settings: dict[str, dict] | None = None,
) -> Iterator[CollapseView]:
    """Measure ``model`` (never changed) on the first ``measured`` of ``images`` (uint8) clean and corrupted and
    yield that; then, ``rounds`` times, adapt a copy per method in ``ADAPTED`` for ``steps_per_round`` more
    batches of the corrupted images (cycling through all of them), measure each copy again and yield the view so
    far. ``settings`` gives each method's settings by method name (e.g. the Lab's tuned ones)."""
    settings = settings or {}
    meter = CollapseMeter(model)
    corrupted = corrupt(images, corruption, severity, generator=torch.Generator().manual_seed(seed))
    probe, probe_labels = corrupted[:measured], labels[:measured]
    with torch.no_grad():
        classes = int(model(images[:1]).shape[-1])
    results = {
        "clean": _measure(meter, model, images[:measured], probe_labels, classes),
        "corrupted": _measure(meter, model, probe, probe_labels, classes),
    }
    batches = [corrupted[i : i + batch_size] for i in range(0, len(corrupted), batch_size)]
    methods = {
        label: create(name, copy.deepcopy(model), **{**settings.get(name, {}), **overrides})
        for label, (name, overrides) in ADAPTED.items()
    }
    history: dict[str, list[tuple[int, float]]] = {label: [] for label in ADAPTED}
    steps = 0
    for round_ in range(rounds + 1):
        if round_:
            for method in methods.values():
                for step in range(steps, steps + steps_per_round):
                    method(batches[step % len(batches)])
            steps += steps_per_round
            for label, method in methods.items():
                results[label] = _measure(meter, method.model, probe, probe_labels, classes)
        view = _view(meter, results, sum(len(batches[s % len(batches)]) for s in range(steps)), history)
        view.finished = round_ == rounds
        yield view


def _view(meter: CollapseMeter, results: dict, images_adapted: int, history: dict) -> CollapseView:
    layer_mean = {condition: meter.layer_means(stds) for condition, (stds, *_) in results.items()}
    for label in history:
        if label in layer_mean:
            history[label].append((images_adapted, sum(layer_mean[label]) / len(layer_mean[label])))
    lower = [
        layer
        for layer, clean, shifted in zip(meter.layers, layer_mean["clean"], layer_mean["corrupted"])
        if shifted < clean
    ]
    return CollapseView(
        layers=meter.layers,
        conditions=list(results),
        expert_std={c: {layer: s.tolist() for layer, s in stds.items()} for c, (stds, *_) in results.items()},
        layer_mean=layer_mean,
        class_counts={condition: counts for condition, (_, counts, *_) in results.items()},
        accuracy={condition: acc for condition, (_, _, acc, _) in results.items()},
        right={condition: right for condition, (*_, right) in results.items()},
        lower_when_corrupted=lower,
        images_adapted=images_adapted,
        history={label: list(points) for label, points in history.items()},
    )


def measure_collapse(*args, **kwargs) -> CollapseView:
    """``collapse_progress`` run to the end: the last view."""
    return deque(collapse_progress(*args, **kwargs), maxlen=1)[0]
