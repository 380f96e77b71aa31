"""The Lab's default run, timed as Start runs it (``run_lab``), on the built-in backbone and on a hub backbone.

A GPU machine without the network has neither a hub backbone's weights nor Imagenette, so the hub run reads them
from local stand-ins laid out as the real ones are (the Hugging Face cache, the Imagenette cache folder): the
architecture's random-init weights, and photos (``_benchmark_images``) saved as JPEGs at the backbone's input size.
Everything else is the Lab's own path: the backbone built from its card, the data from its cache, the SVDs, the
stream, the methods, the meter. Only the panels' figures are left out (the GPU image has no Plotly; on the CPU
they cost ~10 ms an update, ``perf --only lab``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from imse.perf.timing import check

BUILTIN_TARGET_S = 15.0  # issue 37: the built-in model's default run on a GPU


@contextlib.contextmanager
def local_hub_stand_ins(backbone: str, images: int) -> Iterator[None]:
    """For the duration: ``backbone``'s weights in a temporary Hugging Face cache (random init, seed 0: the same
    weights ``perf``'s other benchmarks time, so the SVD cache they filled serves this run too) and ``images``
    photos in a temporary Imagenette cache folder; the SVD cache stays where it was."""
    import huggingface_hub
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from imse.core.svd_cache import default_svd_cache
    from imse.data.sources import imagenet_wnids
    from imse.perf.data import _benchmark_images
    from imse.perf.timing import _prototype

    svd = default_svd_cache()
    saved = {name: os.environ.get(name) for name in ("IMSE_CACHE", "IMSE_SVD_CACHE")}
    hub_cache = huggingface_hub.constants.HF_HUB_CACHE
    with tempfile.TemporaryDirectory(prefix="imse-perf-hub-") as root:
        repo = timm.models.get_pretrained_cfg(backbone).hf_hub_id
        snapshot = Path(root, "hf", "models--" + repo.replace("/", "--"), "snapshots", "0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        save_file(_prototype(backbone.split(".")[0], 0).state_dict(), snapshot / "model.safetensors")
        size = timm.models.get_pretrained_cfg(backbone).input_size[-1]
        photos = _benchmark_images(images, size).permute(0, 2, 3, 1).numpy()
        wnids = imagenet_wnids()[::100][:10]  # ten ImageNet classes, as Imagenette has
        for index, photo in enumerate(photos):
            folder = Path(root, "cache", "imagenette2-320", "val", wnids[index % len(wnids)])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo).save(folder / f"{index}.JPEG", quality=90)
        os.environ["IMSE_CACHE"] = str(Path(root, "cache"))
        os.environ["IMSE_SVD_CACHE"] = str(svd.directory) if svd is not None else "off"
        huggingface_hub.constants.HF_HUB_CACHE = str(Path(root, "hf"))
        try:
            yield
        finally:
            huggingface_hub.constants.HF_HUB_CACHE = hub_cache
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _timed_run(config) -> dict:
    """``run_lab(config)`` to its final state (at the app's update pace), after a one-batch run of the same
    backbone that loads what a warm server has loaded: seconds, updates, and each method's own seconds."""
    from imse.runs.lab import run_lab

    warm = dataclasses.replace(config, corruptions=config.corruptions[:1], per_domain=config.batch_size)
    for _ in run_lab(warm):
        pass
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    updates = 0
    for state in run_lab(config):  # noqa: B007 (the last state is the run's result)
        updates += 1
    seconds = time.perf_counter() - started
    method_seconds = {label: sum(r["methods"][label]["seconds"] for r in state.records) for label in state.methods}
    return {
        "seconds": seconds,
        "updates": updates,
        "images": state.images,
        "batches": len(state.records),
        "method_seconds": method_seconds,
        "mean_accuracy": {label: summary["mean_accuracy"] for label, summary in state.summary.items()},
    }


def bench_lab_default(device: torch.device, backbone: str, precision: str = "fp32", **settings) -> dict:
    """The Lab's default run of ``backbone`` (its card's settings, ``lab_settings``; ``settings`` change some) in
    ``precision``, timed; the built-in one held to ``BUILTIN_TARGET_S``, a hub one to the duration its ZeroGPU
    call would request (where ``imse.app.zerogpu`` can be imported: it needs Gradio)."""
    from imse.data.backbones import SHIPPED, backbone_card
    from imse.runs.lab import LabConfig

    config = LabConfig.from_preset("default", backbone=backbone, device=str(device))
    config = dataclasses.replace(config, precision=precision, **settings)
    shipped = backbone_card(backbone).weights == SHIPPED
    with contextlib.nullcontext() if shipped else local_hub_stand_ins(backbone, config.per_domain):
        run = _timed_run(config)
    result = {"backbone": backbone, "precision": precision, "config": dataclasses.asdict(config), **run}
    methods = " + ".join(config.methods)
    measure = f"Lab default run, {backbone}, {run['images']:,} images, {methods}, {precision}"
    if shipped:
        held = BUILTIN_TARGET_S if backbone == "builtin" and device.type == "cuda" else None
        result["target_s"] = held
        met = None if held is None else run["seconds"] <= held
        said = f"<= {held:.0f} s" if held else "reported"
        result["checks"] = [check(measure, f"{run['seconds']:.1f} s", "-", said, met)]
        return result
    result.update(zerogpu_request(result))
    result["checks"] = [check(f"{measure} (random weights, photos as stand-ins)", f"{run['seconds']:.1f} s",
                              *_request_cells(result))]  # fmt: skip
    return result


def zerogpu_request(result: dict) -> dict:
    """What a hub run's ZeroGPU call would request (``result``: a ``bench_lab_default`` result, or one read back
    from the suite's JSON), and the margin over what the run needs there: zerogpu's own factor for half an H200 over
    the full GPU measured, plus its start-up allowance. Needs Gradio: the GPU image has none, so a GPU session's
    JSON says so and this is called again where Gradio is (docs/performance.md)."""
    from imse.runs.lab import LabConfig

    try:
        from imse.app import zerogpu
    except ImportError as error:
        return {"zerogpu": f"not computed here ({error})"}
    config = LabConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    needed = zerogpu.STARTUP_SECONDS + zerogpu.HALF_H200 * result["seconds"]
    requested = zerogpu.request_seconds(config)
    return {"zerogpu": {"requested_s": requested, "needed_s": needed, "margin": requested / needed}}


def _request_cells(result: dict) -> tuple[str, str, bool | None]:
    request = result["zerogpu"]
    if isinstance(request, str):
        return "-", "ZeroGPU request: compute on a machine with Gradio", None
    cells = f"{request['margin']:.2f}x ({request['requested_s']} s asked, {request['needed_s']:.0f} s needed)"
    return cells, "within the request", request["margin"] >= 1.0
