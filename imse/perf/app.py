"""The app's side: cold start of `python app.py`, and the Lab's default run as Start runs it."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from imse.perf.timing import check


def bench_startup(timeout: float = 120.0) -> dict:
    """Built-in app cold start: ``python app.py`` process start to the page ready in a browser (the Start
    button visible; Debian's chromium through Playwright), or to the first HTTP 200 without a browser."""
    import shutil

    app = Path(__file__).resolve().parents[2] / "app.py"
    if not app.exists():
        skipped = f"no app.py next to the package ({app})"
        return {"skipped": skipped, "checks": [check("app cold start", skipped, "-", "reported", None)]}
    chromium = shutil.which("chromium")
    browser = playwright = None
    if chromium:
        try:
            from playwright.sync_api import sync_playwright

            playwright = sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        except ImportError:
            pass
    started = time.perf_counter()
    result: dict[str, Any] = {}
    process = None
    try:
        process, url = _launch_app(timeout)
        result["server_ready_s"] = time.perf_counter() - started
        if browser is not None:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("button", name="Start").wait_for(state="visible", timeout=timeout * 1000)
            result["page_ready_s"] = time.perf_counter() - started
    finally:
        if process is not None:
            _stop_app(process)
        if browser is not None:
            browser.close()
        if playwright is not None:
            playwright.stop()
    page = f", page ready {result['page_ready_s']:.1f} s" if "page_ready_s" in result else " (no chromium: HTTP only)"
    measured = f"{result['server_ready_s']:.1f} s{page}"
    result["checks"] = [check("app cold start: process to HTTP 200 / page", measured, "-", "reported", None)]
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_app(timeout: float) -> tuple[Any, str]:
    """``python app.py`` on a free port of 127.0.0.1 (offline, no analytics), answering HTTP; (process, url)."""
    import os
    import subprocess
    import sys
    import urllib.request

    app = Path(__file__).resolve().parents[2] / "app.py"
    if not app.exists():
        raise FileNotFoundError(f"no app.py next to the package ({app})")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(app)], cwd=app.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started = time.perf_counter()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with status {process.returncode} while starting")
        if time.perf_counter() - started > timeout:
            process.kill()
            raise TimeoutError(f"app.py did not answer within {timeout:.0f} s")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.05)


def _stop_app(process) -> None:
    """End a ``_launch_app`` server (and, with it, its run workers)."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_arguments(config) -> dict:
    """/start's arguments by name (``imse.app.ui.START_INPUTS``) for a ``LabConfig``, as a client sends them."""
    from imse.app.ui import START_INPUTS

    values = {**dataclasses.asdict(config), "show_source": False, "upload": None}  # the backbone's own data
    return {name: list(values[name]) if isinstance(values[name], tuple) else values[name] for name in START_INPUTS}


def served_run(config, timeout: float = 1800.0) -> dict:
    """One run as a visitor gets it: a fresh ``python app.py`` (warmed by two tiny runs first, one per worker), a
    ``gradio_client`` client on 127.0.0.1 pressing Start with ``config``'s settings; seconds from the press to the
    final output (and to the first update), and each method's correct count per batch, read back from the run's
    download (``records.json``)."""
    import json
    import zipfile

    from gradio_client import Client

    from imse.app.ui import START_OUTPUTS
    from imse.runs.lab import LabConfig

    warm_up = LabConfig(corruptions=("fog",), per_domain=64, device=config.device)
    process, url = _launch_app(timeout=120.0)
    try:
        client = Client(url, verbose=False)
        for _ in range(2):  # warm, as the in-process timing is: a tiny run on each of the server's two workers
            client.predict(**start_arguments(warm_up), api_name="/start")
        arguments = start_arguments(config)
        started = time.perf_counter()
        job = client.submit(**arguments, api_name="/start")
        first = None
        while first is None and not job.done():  # a look every 50 ms until the first update, then none
            if job.outputs():
                first = time.perf_counter() - started
            else:
                time.sleep(0.05)
        # then wait without polling: iterating a job polls every 1 ms, and on 2 cores those wake-ups slow the server's
        # compute (a visitor's browser, on another machine, takes nothing from them)
        final = job.result(timeout=timeout)
        seconds = time.perf_counter() - started
        updates = len(job.outputs())
        download = final[START_OUTPUTS.index("download")]
        download = download.get("value", download) if isinstance(download, dict) else download
        with zipfile.ZipFile(download) as archive:
            records = json.loads(archive.read("records.json"))["records"]
        client.close()
    finally:
        _stop_app(process)
    correct = {label: [r["methods"][label]["correct"] for r in records] for label in records[0]["methods"]}
    return {"seconds": seconds, "first_update_s": first, "updates": updates, "batch_correct": correct}


def unavoidable_compute(config) -> dict:
    """What a run cannot avoid, timed alone: every method's call on every batch of ``config``'s stream (IMSE's
    steps, Source's forwards, ...), the methods built as Start builds them, through the runner without a collapse
    meter (its per-call clock). The panels and the serving are absent, the corruption outside the clock."""
    from imse.runs.lab import build_run
    from imse.runs.memory import keep_freed_memory
    from imse.runs.runner import run

    keep_freed_memory()  # as a Lab run and the CLI compute
    parts = build_run(config, keep_clean=False)
    records = list(run(parts.methods, parts.stream))
    seconds = {label: sum(r["methods"][label]["seconds"] for r in records) for label in parts.methods}
    return {
        "seconds": sum(seconds.values()),
        "method_seconds": seconds,
        "batches": len(records),
        "images": sum(r["n"] for r in records),
        "batch_correct": {label: [r["methods"][label]["correct"] for r in records] for label in parts.methods},
    }


def _in_process_run(config) -> dict:
    """The run in this process as ``run_lab`` yields it, every panel's figure built for every update: time to the
    first update (warm: a first tiny run loads everything), the whole run, and the figures' build and payload."""
    from imse.app import viz
    from imse.runs.lab import LabConfig, run_lab

    for _ in run_lab(LabConfig(corruptions=("fog",), per_domain=64, device=config.device)):
        pass
    started = time.perf_counter()
    first = None
    figure_seconds = []
    for state in run_lab(config):  # at the app's update interval
        built = time.perf_counter()
        figures = [viz.accuracy_figure(state), viz.collapse_figure(state), viz.alignment_figure(state)]
        figures += [viz.shift_figure(state), viz.bank_figure(state), viz.batch_figure(state)]
        payload = sum(len(f.to_json()) for f in figures)
        figure_seconds.append(time.perf_counter() - built)
        if first is None:
            first = time.perf_counter() - started
    return {
        "first_update_s": first,
        "seconds": time.perf_counter() - started,
        "updates": len(figure_seconds),
        "last_payload_bytes": payload,
        "figures_median_s": statistics.median(figure_seconds),
        "images": state.images,
    }


def bench_lab(device: torch.device, repeats: int = 3, served: bool = True) -> dict:
    """The Lab's default run (``LabConfig()``) as Start runs it: in this process with the app's figures (first
    update, figures), then ``repeats`` times, alternately, served (``served_run``: ``python app.py`` and a client)
    and its unavoidable compute (``unavoidable_compute``, the app closed); their ratio, median of the pairs."""
    from imse.runs.lab import LabConfig

    config = LabConfig(device=str(device))
    local = _in_process_run(config)
    pairs = []
    for _ in range(repeats if served else 0):
        run = served_run(config)
        gc.collect()
        compute = unavoidable_compute(config)
        gc.collect()
        pairs.append((run, compute))
    result = {"config": dataclasses.asdict(config), "in_process": local, "targets": LAB_TARGETS}
    result["checks"] = _lab_checks(local, config)
    if pairs:
        ratios = [run["seconds"] / compute["seconds"] for run, compute in pairs]
        result.update(
            served_s=[run["seconds"] for run, _ in pairs],
            served_first_update_s=[run["first_update_s"] for run, _ in pairs],
            unavoidable_s=[compute["seconds"] for _, compute in pairs],
            unavoidable_method_s=[compute["method_seconds"] for _, compute in pairs],
            batches=pairs[0][1]["batches"],
            ratios=ratios,
            ratio=statistics.median(ratios),
            same_records=all(run["batch_correct"] == compute["batch_correct"] for run, compute in pairs),
        )
        result["checks"] += _served_checks(result)
    return result


LAB_TARGETS = {"first_update_s": 2.0, "figures_s": 0.020, "payload_bytes": 200_000, "served_ratio": 1.15}


def _lab_checks(local: dict, config) -> list[dict]:
    first, figures_s, payload = local["first_update_s"], local["figures_median_s"], local["last_payload_bytes"]
    met = first <= LAB_TARGETS["first_update_s"]
    return [
        check("app: first panel update (warm)", f"{first:.2f} s", "-", "<= 2 s", met),
        check(
            f"app: the default run in this process, {local['images']:,} images of {', '.join(config.methods)} "
            f"({local['updates']} updates, figures built)",
            f"{local['seconds']:.1f} s",
            "-",
            "reported",
            None,
        ),
        check(
            "app: one update's figures (median build, payload)",
            f"{figures_s * 1e3:.1f} ms, {payload / 1e3:.0f} KB",
            "-",
            "<= 20 ms, <= 200 KB",
            figures_s <= LAB_TARGETS["figures_s"] and payload <= LAB_TARGETS["payload_bytes"],
        ),
    ]


def _served_checks(result: dict) -> list[dict]:
    served, compute = statistics.median(result["served_s"]), statistics.median(result["unavoidable_s"])
    first = statistics.median(result["served_first_update_s"])
    pairs = len(result["ratios"])
    same = "" if result["same_records"] else " (records DIFFER: not the same work)"
    return [
        check(
            f"app served (python app.py, a gradio_client Start) / its unavoidable compute ({result['batches']} "
            f"batches of method calls alone), median of {pairs}{same}",
            f"{served:.1f} / {compute:.1f} s",
            f"{result['ratio']:.3f}",
            f"<= {LAB_TARGETS['served_ratio']}",
            result["same_records"] and result["ratio"] <= LAB_TARGETS["served_ratio"],
        ),
        check("app served: first update after Start", f"{first:.2f} s", "-", "<= 2 s", first <= 2.0),
    ]
