"""Lab runs on a ZeroGPU Space: each run one GPU call, sized from the run, in the `spaces` package's worker.

How ZeroGPU runs a ``@spaces.GPU`` function (``spaces/zero/wrappers.py``, 0.51.3): in a forked worker process,
its arguments and each value it yields pickled through queues; the visitor's scheduler first weighs the call's
requested ``duration`` against what the visitor has left today (about 2 minutes without sign-in, 3.5 with a free
account, 25 with PRO) and refuses a larger request ("ZeroGPU illegal duration" / "quota exceeded").

So a run here
- requests what it needs: ``STARTUP_SECONDS`` plus images × the methods' measured GPU cost per image on the
  backbone (``imse.app.run_cost``, an H200's, doubled for half of one), times ``MARGIN`` (``request_seconds``);
- is refused before it starts, with the size that fits, when that is above the host's
  ``IMSE_ZEROGPU_MAX_SECONDS`` (``check_fits``);
- downloads its data and warms the SVD cache in the server process first (``prepare``), not on GPU time;
- stops through a ``StopToken`` (a file: the worker sees no memory of the server's after the fork).
Runs on ``cpu`` never take a GPU call.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator

import gradio as gr

from imse.app import run_cost, serving
from imse.app.lab_stream import lab_updates
from imse.runs.lab import LabConfig
from imse.runs.lab_config import run_images

__all__ = [
    "GPU_DEVICE",
    "REFUSED",
    "check_fits",
    "gpu_lab_updates",
    "prepare",
    "refusal",
    "request_seconds",
]

# The device a GPU call computes on. (A test on a machine without CUDA drives the real worker and points this at
# the CPU: the GPU is the one piece nothing else can stand in for.)
GPU_DEVICE = "cuda"
# A ZeroGPU call gets half an H200 by default (a 3g MIG slice: 60 of 132 SMs); run_cost's are a full H200's.
HALF_H200 = 2.0
# Starting a call: the worker's CUDA start, the backbone built on the GPU (weights and SVDs from the disk caches
# ``prepare`` filled), the methods, the first kernels. A stated allowance, not measured on ZeroGPU.
STARTUP_SECONDS = 10.0
# On top of the estimate: the Lab's own per-batch work (corruption on the GPU, the collapse meter's forward,
# the shift readout) and a scheduler that ends a call at its requested duration.
MARGIN = 1.5


def request_seconds(config: LabConfig, *_args) -> int:
    """The duration a run's GPU call requests (``spaces.GPU(duration=...)`` calls this with the call's arguments)."""
    return math.ceil(MARGIN * (STARTUP_SECONDS + HALF_H200 * run_cost.run_seconds(config, "cuda")))


def check_fits(config: LabConfig) -> None:
    """A readable ``gr.Error`` before anything starts when the run's request is above what one call may take,
    saying how many images per domain would fit with these methods."""
    largest = serving.limit("IMSE_ZEROGPU_MAX_SECONDS")
    needed = request_seconds(config)
    if needed <= largest:
        return
    domains = max(1, math.ceil(run_images(config) / config.per_domain))  # one's own domains may hold fewer
    fits = math.floor((largest / MARGIN - STARTUP_SECONDS) / (HALF_H200 * run_cost.per_image(config, "cuda") * domains))
    advice = (
        f"at most {fits:,} images per domain with these methods and corruptions"
        if fits >= 1
        else "fewer corruptions or methods"
    )
    raise gr.Error(
        f"This run would need about {needed} s of GPU in one call; a ZeroGPU call here may take at most "
        f"{largest:.0f} s. Choose {advice}, or Device: cpu (no GPU time, slower).",
        title="Too large for one GPU call",
    )


# The titles of the `spaces` client's errors that mean the scheduler gave no GPU (``spaces/zero/client.py``)
REFUSED = ("ZeroGPU illegal duration", "ZeroGPU quota exceeded", "ZeroGPU queue timeout", "ZeroGPU client error",
           "ZeroGPU pending credits exceeded")  # fmt: skip


def refusal(error: gr.Error, config: LabConfig) -> gr.Error:
    """The scheduler's refusal (its own message kept), with what the run asked for and what the visitor can do."""
    return gr.Error(
        f"ZeroGPU did not start this run, which asked for {request_seconds(config)} s of GPU: "
        f"{str(error.message).rstrip('. ')}. A smaller run asks for less; Device: cpu runs without GPU time.",
        title=error.title,
        print_exception=False,
    )


_PREPARED: set[tuple[str, str]] = set()


def prepare(config: LabConfig, on_download=None) -> None:
    """Download the run's weights and data (``on_download(done, total, what)`` follows them) and fill the SVD cache
    in the server process, once per backbone, so that the GPU call spends its time adapting."""
    from imse.core.spectral import inject
    from imse.core.svd_cache import default_svd_cache
    from imse.data.builders import build_source
    from imse.data.models import create_backbone

    if (config.backbone, config.data) in _PREPARED:
        return
    model = create_backbone(config.backbone, device="cpu", on_download=on_download)
    data_progress = None
    if on_download is not None:

        def data_progress(done: int, total: int | None) -> None:
            on_download(done, total, "Downloading Imagenette (once; then cached)")

    build_source(config.data, config.backbone, model.input_size, progress=data_progress)
    inject(copy.deepcopy(model), cache=default_svd_cache())
    _PREPARED.add((config.backbone, config.data))


def _gpu_call(config: LabConfig, show_source: bool, stop: serving.StopToken, exports: str) -> Iterator[tuple]:
    """The GPU call: the run on the worker's GPU."""
    yield from lab_updates(dataclasses.replace(config, device=GPU_DEVICE), show_source, stop, exports)


try:  # the `spaces` package is installed on Spaces; elsewhere (and without SPACES_ZERO_GPU) it changes nothing
    import spaces

    _gpu_call = spaces.GPU(duration=request_seconds)(_gpu_call)
except ImportError:
    pass


def gpu_lab_updates(
    config: LabConfig, show_source: bool, stop: serving.StopToken, exports: str, on_download=None
) -> Iterator[tuple]:
    """``lab_updates`` through one GPU call; a refused request becomes the visitor's readable message."""
    check_fits(config)
    prepare(config, on_download)
    try:
        yield from _gpu_call(config, show_source, stop, exports)
    except gr.Error as error:
        if getattr(error, "title", None) in REFUSED:
            raise refusal(error, config) from None
        raise
