"""The app's side: cold start of `python app.py`, and the Lab's default run as Start runs it."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from imse.perf.timing import check


def bench_startup(timeout: float = 120.0) -> dict:
    """Built-in app cold start: ``python app.py`` process start to the page ready in a browser (the Start
    button visible; Debian's chromium through Playwright), or to the first HTTP 200 without a browser."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import urllib.request

    app = Path(__file__).resolve().parents[2] / "app.py"
    if not app.exists():
        skipped = f"no app.py next to the package ({app})"
        return {"skipped": skipped, "checks": [check("app cold start", skipped, "-", "reported", None)]}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
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
    process = subprocess.Popen(
        [sys.executable, str(app)], cwd=app.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    result: dict[str, Any] = {}
    try:
        while "server_ready_s" not in result:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with status {process.returncode} while starting")
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"app.py did not answer within {timeout:.0f} s")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        result["server_ready_s"] = time.perf_counter() - started
            except OSError:
                time.sleep(0.05)
        if browser is not None:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("button", name="Start").wait_for(state="visible", timeout=timeout * 1000)
            result["page_ready_s"] = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=10)
        if browser is not None:
            browser.close()
        if playwright is not None:
            playwright.stop()
    page = f", page ready {result['page_ready_s']:.1f} s" if "page_ready_s" in result else " (no chromium: HTTP only)"
    measured = f"{result['server_ready_s']:.1f} s{page}"
    result["checks"] = [check("app cold start: process to HTTP 200 / page", measured, "-", "reported", None)]
    return result


def bench_lab(device: torch.device) -> dict:
    """What the app's Start does on the built-in backbone: time to the first panel update (warm: a first tiny
    run loads everything) and the whole default run (``LabConfig()``: the Lab's defaults), figures included."""
    from imse.app import viz
    from imse.runs.lab import LabConfig, run_lab

    warm = LabConfig(corruptions=("fog",), per_domain=64, device=str(device))
    for _ in run_lab(warm):
        pass
    config = LabConfig(device=str(device))
    started = time.perf_counter()
    first = None
    updates = 0
    figure_seconds = []
    for state in run_lab(config):  # at the app's update interval
        built = time.perf_counter()
        figures = [viz.accuracy_figure(state), viz.collapse_figure(state), viz.alignment_figure(state)]
        figures += [viz.shift_figure(state), viz.bank_figure(state), viz.batch_figure(state)]
        payload = sum(len(f.to_json()) for f in figures)
        figure_seconds.append(time.perf_counter() - built)
        updates += 1
        if first is None:
            first = time.perf_counter() - started
    total, figures_s = time.perf_counter() - started, statistics.median(figure_seconds)
    targets = {"first_update_s": 5.0, "total_s": 120.0, "figures_s": 0.020, "payload_bytes": 200_000}
    return {
        "first_update_s": first,
        "total_s": total,
        "updates": updates,
        "last_payload_bytes": payload,
        "figures_median_s": figures_s,
        "images": state.images,
        "config": dataclasses.asdict(config),
        "targets": targets,
        "checks": [
            check(
                "app: first panel update (warm)", f"{first:.2f} s", "-", "<= 5 s", first <= targets["first_update_s"]
            ),
            check(
                f"app: the default run, {state.images:,} images of {', '.join(config.methods)} ({updates} updates)",
                f"{total:.1f} s",
                "-",
                "<= 120 s",
                total <= targets["total_s"],
            ),
            check(
                "app: one update's figures (median build, payload)",
                f"{figures_s * 1e3:.1f} ms, {payload / 1e3:.0f} KB",
                "-",
                "<= 20 ms, <= 200 KB",
                figures_s <= targets["figures_s"] and payload <= targets["payload_bytes"],
            ),
        ],
    }
