"""What a Lab run costs before it starts: seconds per image from the methods' measured steps, times its images;
for a backbone or method nobody measured, an estimate from its FLOPs and its declared passes per step.

Read from the shipped measurements (``python -m imse perf --only methods``: each method's step at batch 64, fp32),
on an H200 (``cuda``) and on 2 CPU cores (``cpu``). A ZeroGPU call's requested duration (``imse.app.zerogpu``) and a
waiting visitor's estimated wait (``imse.app.run_queue``) both start from here.
"""

from __future__ import annotations

import functools
import json
import math

from imse.core.methods import METHODS
from imse.core.resources import asset_path
from imse.data.backbones import backbone_card
from imse.data.vit_tags import forward_gflops
from imse.runs.lab import LabConfig, method_name
from imse.runs.lab_config import run_images

__all__ = ["run_seconds", "seconds_per_image"]

MEASURED = {"cuda": "perf_methods_h200.json", "cpu": "perf_methods_cpu.json"}


@functools.cache
def _measured(device: str, precision: str = "fp32") -> dict[str, dict[str, float]]:
    """Model -> method -> seconds per batch-64 step, in ``precision`` where the measurements have it (``perf
    --suite`` measures each; older files only fp32, which stands in for the others)."""
    data = json.loads(asset_path("results", MEASURED[device]).read_text())
    steps = [entry for entry in data["method_steps"] if entry["batch"] == 64]
    chosen = [entry for entry in steps if entry.get("precision", "fp32") == precision]
    fallback = [entry for entry in steps if entry.get("precision", "fp32") == "fp32"]
    return {entry["model"]: entry["step_s"] for entry in (chosen or fallback)}


def _steps(backbone: str, device: str, precision: str = "fp32") -> dict[str, float]:
    """Each measured method's seconds per batch-64 step on ``backbone``: its card's measured architecture
    (``cost_as``), else the measured architecture nearest in FLOPs, scaled by the FLOPs of one image's forward
    (``forward_gflops``, from the shapes: any timm ViT tag has an estimate)."""
    table = _measured(device, precision)
    card = backbone_card(backbone)
    if card is not None and card.cost_as in table:
        return table[card.cost_as]
    flops = forward_gflops(backbone)
    near = min(table, key=lambda measured: abs(math.log(forward_gflops(measured) / flops)))
    scale = flops / forward_gflops(near)
    return {method: seconds * scale for method, seconds in table[near].items()}


def seconds_per_image(backbone: str, method: str, device: str, precision: str = "fp32") -> float:
    """One method's seconds per image (batch 64). A method the measurements lack (one registered later) costs what
    it declares: its ``step_passes`` forward-equivalents, each a third of TENT's step (a forward and its
    backward)."""
    steps = _steps(backbone, "cuda" if device == "cuda" else "cpu", precision)
    if method in steps:
        return steps[method] / 64
    per_pass = steps["tent"] / METHODS["tent"].step_passes
    return per_pass * METHODS[method].step_passes / 64


def per_image(config: LabConfig, device: str) -> float:
    """Seconds per image of the whole run: every method, and one more forward for the Lab's own readouts."""
    methods = [method_name(label) for label in config.methods]
    return sum(seconds_per_image(config.backbone, m, device, config.precision) for m in methods + ["source"])


def run_seconds(config: LabConfig, device: str) -> float:
    return run_images(config) * per_image(config, device)
