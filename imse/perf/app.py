"""The app's side: cold start of `python app.py`, and the Lab's default run as Start runs it."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch


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
        return {"skipped": f"no app.py next to the package ({app})"}
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
    return {
        "first_update_s": first,
        "total_s": time.perf_counter() - started,
        "updates": updates,
        "last_payload_bytes": payload,
        "figures_median_s": statistics.median(figure_seconds),
        "images": state.images,
        "config": dataclasses.asdict(config),
        "targets": {"first_update_s": 5.0, "total_s": 120.0, "payload_bytes": 200_000},
    }
