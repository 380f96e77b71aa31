"""A crowd on the free tier: a dozen visitors press Start within a second on 2 cores (gradio_client threads on
127.0.0.1, a bounded loop, short runs). Each either computes or is told its place and wait; two leave mid-way;
the finished runs equal the same runs done alone, and the whole takes about what the runs take back to back.
Prints its numbers (docs/hosting.md quotes them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import assert_equal_to_float32_rounding
from served import client, launch_app, output, stop_app
from test_app import family, start_args

from imse.runs.memory import resident_bytes

VISITORS = 12
# Who disconnects, claimed as the crowd goes: the first told a place of 4 or more leaves while waiting, and the first
# that waited and then computes leaves at once (the third run: the others still wait behind it).
ROLES = ("left waiting", "left computing")
WAITING = re.compile(r"Waiting for a free slot\*\*: (\d+)\w\w in line, about (\d+) s")


def short_run(visitor: int) -> list:
    """About 6 s alone on 2 cores: 10 batches of IMSE and Source."""
    return start_args(corruptions=["fog", "contrast"], per_domain=320, seed=visitor)


def summary_of(outputs) -> dict:
    with zipfile.ZipFile(output(outputs, "download")) as archive:
        summary = json.loads(archive.read("records.json"))["summary"]
    return {label: {k: v for k, v in e.items() if k not in ("seconds", "images_per_s")} for label, e in summary.items()}


def updates_of(job, every: float = 0.05):
    """Each of a job's updates in order, read every 50 ms. gradio_client's own iterator polls every millisecond per
    job: a dozen visitors iterating that way spun 10.5 CPU-s of the 2 cores in a crowd of 80 s (2.6 s for the same
    runs back to back), work that remote browsers do not do on the server's machine."""
    read = 0
    while True:
        finished = job.done()
        outputs = job.outputs()
        yield from outputs[read:]
        read = len(outputs)
        if finished:
            return
        time.sleep(every)


def visit(url: str, visitor: int, go: threading.Event, seen: dict, roles: dict) -> None:
    """One visitor: press Start with the others, read every update; a leaver closes its connection."""
    c = client(url)
    go.wait()
    seen["pressed"] = time.perf_counter()
    job = c.submit(*short_run(visitor), api_name="/start")
    seen["places"], seen["errors"] = [], []
    try:
        for update in updates_of(job):
            now = time.perf_counter()
            seen.setdefault("first", now)
            status = output(update, "status") or ""
            if match := WAITING.search(status):
                seen["places"].append((now, int(match[1]), int(match[2])))
                role = "left waiting" if int(match[1]) >= 4 else None
            else:
                seen.setdefault("computing", now)
                role = "left computing" if seen["places"] else None
            with roles["lock"]:
                leaving = role is not None and role not in roles
                if leaving:
                    roles[role] = visitor
            if leaving:
                seen["left"] = time.perf_counter()
                job.cancel()
                c.close()
                return
        job.result()  # raises what the run raised
        seen["summary"] = summary_of(job.outputs()[-1])
        seen["done"] = time.perf_counter()
    except Exception as error:  # a visitor must never get one
        seen["errors"].append(f"{type(error).__name__}: {error}")


def time_alone(url: str, visitors, alone: dict, seconds: dict) -> None:
    """Each visitor's run with nothing else running: its records and its seconds, Start to the last update."""
    for visitor in visitors:
        visitor_client = client(url)  # connected first, as each visitor of the crowd is before it presses Start
        started = time.perf_counter()
        alone[visitor] = summary_of(visitor_client.predict(*short_run(visitor), api_name="/start"))
        seconds[visitor] = time.perf_counter() - started


@pytest.mark.slow  # load and timing: a dozen runs at once, and each alone
def test_a_dozen_visitors_at_once_on_two_cores(tmp_path):
    process, url = launch_app()
    try:
        client(url).predict(*short_run(99), api_name="/start")  # warm: imports, kernels, corruption caches
        alone, seconds = {}, {}
        # each run alone, half of them before the crowd and half after: the shared machine's drift in speed
        # over the test's minutes cancels (to first order) instead of landing on the ratio
        time_alone(url, range(VISITORS // 2), alone, seconds)

        go, seen, roles = threading.Event(), {visitor: {} for visitor in range(VISITORS)}, {"lock": threading.Lock()}
        threads = [threading.Thread(target=visit, args=(url, v, go, seen[v], roles)) for v in range(VISITORS)]
        for thread in threads:
            thread.start()
        time.sleep(2)  # every client connected
        started = time.perf_counter()
        go.set()
        for thread in threads:
            thread.join(timeout=600)
        crowd = max(s.get("done", s.get("left", 0)) for s in seen.values()) - started
        peak = sum(resident_bytes(member, "VmHWM") for member in family(process.pid))  # server and workers
        time_alone(url, range(VISITORS // 2, VISITORS), alone, seconds)
        screenshot = waiting_in_the_browser(url, tmp_path) if shutil.which("chromium") else None
    finally:
        stop_app(process)

    assert all(not s["errors"] for s in seen.values()), {v: s["errors"] for v, s in seen.items() if s["errors"]}
    assert all(role in roles for role in ROLES), roles
    finished = [v for v, s in seen.items() if "summary" in s]
    back_to_back = sum(seconds[v] for v in finished)  # the runs that finished in the crowd, each timed alone
    first = max(s["first"] - s["pressed"] for s in seen.values())
    waited = [v for v, s in seen.items() if s["places"]]
    report = {
        "back_to_back_s": round(back_to_back, 1),
        "crowd_s": round(crowd, 1),
        "ratio": round(crowd / back_to_back, 3),
        "slowest_first_update_s": round(first, 2),
        "visitors_told_their_place": len(waited),
        "peak_rss_mib": round(peak / 2**20),
        "screenshot": str(screenshot),
    }
    for v in waited:  # the first place and wait each was told, and when it really started computing
        told, place, wait = seen[v]["places"][0]
        if "computing" in seen[v]:
            after = seen[v]["computing"] - told
            report[f"visitor {v}"] = f"told {place} in line, ~{wait} s; computed after {after:.0f} s"
    left = seen[roles["left computing"]]["left"]  # its slot goes to the next in line once the server sees it gone
    report["slot_freed_after_s"] = round(
        min(s["computing"] for s in seen.values() if s.get("computing", 0) > left) - left, 2
    )
    print(json.dumps(report, indent=1))
    assert first <= 8.0, "every visitor hears from the server within seconds"  # 37 s before the run queue
    assert report["slot_freed_after_s"] <= 5.0  # the heartbeat notices the leaver (1 s here), then one batch
    assert len(waited) >= VISITORS - 2 - 1  # all but the two computing at once were told their place
    for v, s in seen.items():  # the places only ever move up
        places = [place for _, place, _ in s["places"]]
        assert places == sorted(places, reverse=True), (v, places)
    assert len(finished) == VISITORS - len(ROLES)
    for visitor in finished:
        # the same run alone: counts equal; confidence, entropy and alignment std to float32 rounding (a run in the
        # crowd computes on fewer threads: run_workers gives each cores // runs computing)
        assert_equal_to_float32_rounding(seen[visitor]["summary"], alone[visitor], f"visitor {visitor}")
    assert crowd <= 1.15 * back_to_back, report


def waiting_in_the_browser(url: str, folder: Path) -> Path:
    """A visitor in the browser behind two runs: what the page says while it waits (screenshot)."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("IMSE_SCREENSHOTS", folder))
    others = [client(url).submit(*short_run(50 + i), api_name="/start") for i in range(3)]
    try:
        with sync_playwright() as p:
            chromium = shutil.which("chromium")
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.get_by_role("button", name="Start").click()
            page.get_by_text(re.compile("Waiting for a free slot")).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            path = shots / "crowd-waiting.png"
            page.screenshot(path=path)
            browser.close()
    finally:
        for job in others:
            job.cancel()
    return path
