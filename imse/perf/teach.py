"""The Teach tab's views on the built-in backbone: how long each takes to answer, as a visitor meets them.

Each view is timed from a cold view cache (the backbone itself loaded: the page load does that), several times,
median reported. The collapse view streams: its first answer (clean vs corrupted) and the gap between its
updates are timed. The step view's answer is compared with one IMSE step on the same batch size, which it
necessarily contains.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time

import torch

from imse.perf.timing import check

TARGET_S = 2.0


def _seconds(fn, **inputs) -> float:
    start = time.perf_counter()
    fn(**inputs)
    return time.perf_counter() - start


def bench_teach(repeats: int = 3) -> dict:
    from imse.app import teach, teach_data

    teach_data.spectral_backbone()  # loaded with the page, not by a view
    teach_data.view_images("builtin")
    layers = list(teach.layer_ranks())
    samples = [label for _, label in teach_data.sample_images()]
    times: dict[str, list[float]] = {name: [] for name in ("experts", "experts_all", "slider", "domains", "retrieve")}
    times.update(collapse_first=[], collapse_update=[], step_first=[], step_next=[], step_many=[], imse_step=[])
    for repeat in range(repeats):
        teach.clear_caches()
        _time_answers(times, layers[(5 * repeat) % len(layers)], samples, repeat)
        _time_collapse(times)
        _time_step(times)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"repeats": repeats, "median_s": medians, "samples_s": times, "target_s": TARGET_S,
            "checks": _teach_checks(medians)}  # fmt: skip


def _time_answers(times: dict[str, list[float]], layer: str, samples: list[str], repeat: int) -> None:
    """The views that answer at once: spectral experts (one layer, every layer, a slider move) and domains (a
    first map at a severity, another new batch)."""
    from imse.app import teach

    view = functools.partial(teach.experts_view, backbone="builtin", layer=layer, upload=None)
    times["experts"].append(_seconds(view, scope="this layer", k=16, expert=0, scale=1.0, sample=samples[0]))
    times["experts_all"].append(_seconds(view, scope="every layer", k=16, expert=0, scale=1.0, sample=samples[0]))
    times["slider"].append(_seconds(view, scope="every layer", k=24 + repeat, expert=3, scale=2.0, sample=samples[1]))
    domains = dict(backbone="builtin", severity=3, stored=["fog", "snow"])
    times["domains"].append(_seconds(teach.domains_view, **domains, incoming="snow"))
    times["retrieve"].append(_seconds(teach.domains_view, **domains, incoming="contrast"))


def _time_collapse(times: dict[str, list[float]]) -> None:
    """The collapse view streams: its first answer, then the gap between two updates."""
    from imse.app import teach

    stream = teach.collapse_view(backbone="builtin", corruption="contrast", severity=3, collapse_layer=None)
    start = time.perf_counter()
    next(stream)
    times["collapse_first"].append(time.perf_counter() - start)
    for _ in range(2):
        start = time.perf_counter()
        next(stream)
        times["collapse_update"].append(time.perf_counter() - start)
    stream.close()


def _time_step(times: dict[str, list[float]]) -> None:
    """The step view, first and next, the gap between two updates of "Step × 10" (it streams), and one IMSE step
    alone on the same batch size (which each of them contains)."""
    from imse.app import teach, teach_data
    from imse.core.methods import create
    from imse.data.corruptions import corrupt

    inputs = dict(backbone="builtin", corruption="contrast", severity=3)
    start = time.perf_counter()
    explorer = teach.step_view(explorer=None, **inputs)["explorer"]
    times["step_first"].append(time.perf_counter() - start)
    times["step_next"].append(_seconds(teach.step_view, explorer=explorer, **inputs))
    stream = teach.step_many(explorer=explorer, **inputs)
    next(stream)
    start = time.perf_counter()
    next(stream)
    times["step_many"].append(time.perf_counter() - start)
    stream.close()
    images, _ = teach_data.view_images("builtin")
    batch = corrupt(images[:64], "contrast", 3, generator=torch.Generator().manual_seed(0))
    method = create("imse", copy.deepcopy(teach_data.spectral_backbone()), **teach.method_settings("builtin")["imse"])
    method(batch)  # the view's own step is its second call too
    times["imse_step"].append(_seconds(lambda: method(batch)))


def _teach_checks(medians: dict[str, float]) -> list:
    """Each view's median against 2 s (the step view's: 2 s more than the IMSE step it contains)."""
    step_budget = TARGET_S + medians["imse_step"]
    rows = [
        ("1 spectral experts, first answer for a layer (curve computed)", "experts", TARGET_S),
        ("1 spectral experts, first answer for every layer", "experts_all", TARGET_S),
        ("1 spectral experts, a slider move", "slider", TARGET_S),
        ("2 collapse, first answer (clean vs corrupted)", "collapse_first", TARGET_S),
        ("2 collapse, each streamed update (4 methods x 2 steps + measure)", "collapse_update", TARGET_S),
        ("3 one IMSE step, first (copy + step)", "step_first", step_budget),
        ("3 one IMSE step, next", "step_next", step_budget),
        ("3 Step x 10, each streamed update", "step_many", step_budget),
        ("4 domains, first answer at a severity (16 descriptors)", "domains", TARGET_S),
        ("4 domains, another new batch", "retrieve", TARGET_S),
    ]
    checks = [
        check(f"teach {label}", f"{medians[key]:.2f} s", "-", f"<= {target:.2f} s", medians[key] <= target)
        for label, key, target in rows
    ]
    checks.append(check("teach: one IMSE step alone (b64, built-in)", f"{medians['imse_step']:.2f} s", "-",
                        "reported", None))  # fmt: skip
    return checks
