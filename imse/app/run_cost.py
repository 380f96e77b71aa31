"""What a Lab run costs before it starts: seconds per image from the methods' measured steps, times its images.

Read from the shipped measurements (``python -m imse perf --only methods``: each method's step at batch 64, fp32),
on an H200 (``cuda``) and on 2 CPU cores (``cpu``). A ZeroGPU call's requested duration (``imse.app.zerogpu``) and a
waiting visitor's estimated wait (``imse.app.run_queue``) both start from here.
"""

from __future__ import annotations

import functools
import json

from imse.core.resources import asset_path
from imse.data.backbones import backbone_card
from imse.runs.lab import LabConfig, method_name
from imse.runs.lab_config import run_images

__all__ = ["run_seconds", "seconds_per_image"]

MEASURED = {"cuda": "perf_methods_h200.json", "cpu": "perf_methods_cpu.json"}
# GFLOPs per 224-px image (timm's model cards): an architecture a table lacks costs as a measured one, scaled
GFLOPS = {"vit_small_patch16_224": 4.6, "vit_base_patch16_224": 17.6}


@functools.cache
def _measured(device: str) -> dict[str, dict[str, float]]:
    data = json.loads(asset_path("results", MEASURED[device]).read_text())
    return {entry["model"]: entry["step_s"] for entry in data["method_steps"] if entry["batch"] == 64}


def _steps(backbone: str, device: str) -> dict[str, float]:
    table, architecture = _measured(device), backbone_card(backbone).cost_as  # the card's
    if architecture in table:
        return table[architecture]
    near = next(name for name in GFLOPS if name in table)
    scale = GFLOPS[architecture] / GFLOPS[near]
    return {method: seconds * scale for method, seconds in table[near].items()}


def seconds_per_image(backbone: str, method: str, device: str) -> float:
    """One method's seconds per image (batch 64). Source costs one forward: a third of TENT's step (a forward
    and its backward)."""
    steps = _steps(backbone, "cuda" if device == "cuda" else "cpu")
    step = steps["tent"] / 3 if method == "source" else steps[method]
    return step / 64


def per_image(config: LabConfig, device: str) -> float:
    """Seconds per image of the whole run: every method, and one more forward for the Lab's own readouts."""
    methods = [method_name(label) for label in config.methods]
    return sum(seconds_per_image(config.backbone, m, device) for m in methods + ["source"])


def run_seconds(config: LabConfig, device: str) -> float:
    return run_images(config) * per_image(config, device)
