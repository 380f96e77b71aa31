"""The app end to end: launched as users launch it (python app.py), driven through gradio_client and a browser."""

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_equal_to_float32_rounding
from served import client, launch_app, output, stop_app

ROOT = Path(__file__).resolve().parent.parent
from imse.app.ui import START_INPUTS  # noqa: E402
from imse.runs.defaults import lab_settings  # noqa: E402

LAB = lab_settings()  # the app's own IMSE lr and λ_dm, so the CLI (same defaults) must give the same numbers
SHORT = dict(
    backbone="builtin",
    scenario="continual",
    corruptions=["fog", "gaussian_noise", "contrast"],
    severity=5,
    methods=["IMSE", "Source"],
    batch_size=64,
    per_domain=128,
    seed=0,
    imse_lr=LAB["imse_lr"],
    lambda_dm=LAB["lambda_dm"],
    tau=0.05,
    rounds=3,
    device="cpu",
    show_source=False,
    precision="fp32",  # a client may leave it out, and what follows (tests/test_precision.py)
    upload=None,  # the backbone's own data
    upload_streams="as-is",
    upload_labels="folders",
)


def start_args(base: dict = SHORT, **changes) -> list:
    """/start's arguments, in its order, from settings by name."""
    values = {**base, **changes}
    assert values.keys() == set(START_INPUTS)
    return [values[name] for name in START_INPUTS]


def test_streamed_run_matches_the_cli(app_url):
    """A client that calls /start by name (every setting a keyword, as ``gradio_client`` sends them) gets the run
    the CLI computes."""
    from imse.runs.bench import run_bench

    run = {**SHORT, "per_domain": 64}  # a batch per domain
    job = client(app_url).submit(**run, api_name="/start")
    updates = list(job)
    final = job.outputs()[-1]
    assert len(updates) >= 2  # streamed, not one final answer
    assert "finished" in output(final, "status")
    table = output(final, "results")
    headers, rows = table["headers"], table["data"]
    assert headers[:5] == ["method", "fog-5", "gaussian_noise-5", "contrast-5", "mean"]
    assert headers[5:] == ["vs Source (pts)", "expert std", "top-class share (%)", "trainable values", "× IMSE's"]
    download = output(final, "download")
    assert Path(download).suffix == ".zip" and Path(download).stat().st_size > 0
    cli = run_bench(
        methods=("imse", "source"),
        scenario=run["scenario"],
        corruptions=run["corruptions"],
        severity=run["severity"],
        per_domain=run["per_domain"],
        batch_size=run["batch_size"],
        seeds=(run["seed"],),
        progress=False,
    )
    for row, name in zip(rows, ("imse", "source")):
        expected = [round(100 * d["accuracy"], 1) for d in cli["methods"][name]["domains"]]
        assert row[1:4] == expected, (row, expected)


@pytest.mark.slow  # timing: stops a run mid-stream
def test_cancel_stops_the_run_and_the_app_keeps_working(app_url):
    from gradio_client.utils import Status

    c = client(app_url)
    long_run = start_args(corruptions=["fog", "contrast", "snow", "frost", "brightness"], per_domain=2000)
    job = c.submit(*long_run, api_name="/start")
    deadline = time.time() + 60
    while time.time() < deadline and len(job.outputs()) < 1:
        time.sleep(0.2)
    assert job.outputs(), "no update arrived"
    job.cancel()
    time.sleep(2)
    assert job.status().code in (Status.CANCELLED, Status.FINISHED)
    assert "finished" not in output(job.outputs()[-1], "status")
    started = time.time()
    after = c.submit(*start_args(), api_name="/start")
    assert "finished" in output(after.result(), "status")
    assert time.time() - started < 120


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch size|minimum value 1"),  # the widget's own range check answers first
        ({"batch_size": 100_000}, "batch size|maximum value"),
        ({"per_domain": 0}, "images per domain|minimum value 1"),
        ({"per_domain": 10**7}, "images|maximum value 200000"),
        ({"methods": []}, "at least one method"),
        ({"corruptions": []}, "at least one corruption"),
        ({"tau": -1.0}, "τ"),
        ({"rounds": 0}, "rounds|minimum value 1"),
    ],
)
def test_bad_input_is_a_readable_message_and_the_app_keeps_working(app_url, change, message):
    from gradio_client.exceptions import AppError

    c = client(app_url)
    with pytest.raises(AppError, match=message) as raised:
        c.predict(*start_args(**change), api_name="/start")
    assert "Traceback" not in str(raised.value)


def test_a_preset_by_name_through_the_api_and_a_bad_one_is_a_readable_message(app_url):
    from gradio_client.exceptions import AppError

    from imse.app.ui import SETTINGS
    from imse.runs.defaults import PRESETS

    c = client(app_url)
    for name, preset in PRESETS.items():
        values = c.predict(name, "builtin", api_name="/preset")
        loaded = dict(zip(SETTINGS, values))
        assert {k: loaded[k] for k in preset.settings} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in preset.settings.items()
        }
    for bad in ("nope", ""):
        with pytest.raises(AppError, match="unknown preset") as raised:
            c.predict(bad, "builtin", api_name="/preset")
        assert "Traceback" not in str(raised.value)


CHROMIUM = shutil.which("chromium")


@pytest.mark.slow  # browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_start_panels_stop_and_no_outside_request(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1500, "height": 2000})
        page.on(
            "request",
            lambda r: outside.append(r.url) if not r.url.startswith((app_url, "data:", "blob:")) else None,
        )
        page.goto(app_url)  # not "networkidle": the session's heartbeat stream (tab-close detection) stays open
        page.get_by_role("button", name="Start").wait_for(state="visible")
        number = page.get_by_label("Images per domain")
        number.fill("64")
        number.press("Tab")
        page.get_by_role("button", name="Start").click()
        page.wait_for_function(
            "document.querySelectorAll('.js-plotly-plot').length >= 5 && "
            "[...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes('batch 3'))",
            timeout=120_000,
        )
        page.get_by_role("button", name="Stop").click()
        page.wait_for_timeout(1000)
        titles = page.eval_on_selector_all(".gtitle", "els => els.map(e => e.textContent)")
        page.screenshot(path=str(tmp_path / "lab.png"), full_page=True)
        browser.close()
    assert any("Online accuracy" in t for t in titles) and any("Domain bank" in t for t in titles)
    assert any("Singular-value shifts" in t for t in titles) and any("current batch" in t for t in titles)
    assert any("alignment" in t for t in titles)
    assert (tmp_path / "lab.png").stat().st_size > 10_000
    assert outside == []


@pytest.mark.slow  # browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_walks_the_four_teach_views_with_no_outside_request(app_url, tmp_path):
    """Each Teach view in chromium: it draws its figures and says what it measured; a screenshot of each goes to
    ``$IMSE_SCREENSHOTS`` (else the test's temporary folder)."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("IMSE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    outside = []

    def titles(page) -> list[str]:
        return page.eval_on_selector_all(".gtitle", "els => els.map(e => e.textContent)")

    def settle(page) -> None:
        """Every output drawn: no status tracker still shows an event in progress."""
        page.wait_for_function("!document.querySelector('.wrap.pending, .wrap.generating')", timeout=60_000)
        page.wait_for_timeout(500)

    def wait_for_title(page, text: str, timeout: float = 60_000) -> None:
        page.wait_for_function(
            f"[...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes({text!r}))", timeout=timeout
        )

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1700})
        page.on(
            "request",
            lambda r: outside.append(r.url) if not r.url.startswith((app_url, "data:", "blob:")) else None,
        )
        page.goto(app_url)
        page.get_by_role("tab", name="Teach: how IMSE works").click()
        wait_for_title(page, "experts kept")
        page.get_by_label("every layer").check()
        wait_for_title(page, "(every layer)")
        settle(page)
        k = page.get_by_label("number input for k", exact=True)
        k.fill("16")
        k.press("Enter")
        wait_for_title(page, "16 of 128 experts kept")
        settle(page)
        page.screenshot(path=str(shots / "teach-1-experts.png"), full_page=True)
        experts = page.locator("#teach-experts-text").inner_text()

        page.get_by_role("tab", name="2 · Collapse, measured").click()
        page.get_by_role("button", name="Measure").click()
        page.wait_for_function(
            "document.querySelector('#teach-collapse-text').textContent.includes('(done)')", timeout=180_000
        )
        settle(page)
        page.screenshot(path=str(shots / "teach-2-collapse.png"), full_page=True)
        collapse = page.locator("#teach-collapse-text").inner_text()

        page.get_by_role("tab", name="3 · IMSE, step by step").click()
        for batch in (1, 2):  # a click while the step runs is ignored (Gradio's trigger mode "once")
            page.get_by_role("button", name="Step", exact=True).click()
            page.wait_for_function(f"document.querySelector('#teach-step-text').textContent.includes('Batch {batch} ')")
        page.get_by_role("button", name="Step × 10").click()  # streamed: each step answers as it is taken
        page.wait_for_function("document.querySelector('#teach-step-text').textContent.includes('Batch 12 ')")
        settle(page)
        page.screenshot(path=str(shots / "teach-3-step.png"), full_page=True)
        step = page.locator("#teach-step-text").inner_text()

        page.get_by_role("tab", name="4 · Domains and retrieval").click()
        wait_for_title(page, "KL to each slot")
        settle(page)
        page.screenshot(path=str(shots / "teach-4-domains.png"), full_page=True)
        domains = page.locator("#teach-domains-text").inner_text()
        seen = titles(page)
        browser.close()
    assert "only the 16 largest experts kept in every one of the 24 layers" in experts
    assert "After 768 corrupted images" in collapse and "TENT" in collapse
    assert "Best: " in collapse or "Highest, though not beyond noise: " in collapse  # the verdict, read as it came
    assert "Batch 12 of the stream's 40 (contrast 3" in step and "E0 = 0.921" in step
    assert "The stream so far (768 images;" in step
    assert "Retrieval, when detection fires: slot 3, snow" in domains
    assert any("Symmetric KL" in t for t in seen) and any("Domain map" in t for t in seen)
    assert all((shots / f"teach-{n}.png").stat().st_size > 20_000 for n in
               ("1-experts", "2-collapse", "3-step", "4-domains"))  # fmt: skip
    assert outside == []


# -- a public Space: many users, closed tabs, limits, no way onto the server's disk ---------------------------


def final_summary(c, arguments):
    """Run to the end; what it measured from its download (full precision, not the rounded table; timings
    dropped, they differ between any two runs)."""
    import json
    import zipfile

    outputs = c.predict(*arguments, api_name="/start")
    assert "finished" in output(outputs, "status"), output(outputs, "status")
    download = output(outputs, "download")
    with zipfile.ZipFile(download) as archive:
        summary = json.loads(archive.read("records.json"))["summary"]
    return {
        label: {k: v for k, v in entry.items() if k not in ("seconds", "images_per_s")}
        for label, entry in summary.items()
    }


@pytest.mark.slow  # load: four full runs at once, then alone
def test_four_simultaneous_users_get_what_each_would_get_alone(app_url):
    from concurrent.futures import ThreadPoolExecutor

    runs = []
    for seed, methods in enumerate((["IMSE", "Source"], ["SAR", "TENT"], ["IMSE + retrieval (top-1)"], ["IMSE"])):
        runs.append(start_args(methods=methods, per_domain=64, seed=seed))
    with ThreadPoolExecutor(len(runs)) as pool:  # one client (one session) per user
        together = list(pool.map(lambda a: final_summary(client(app_url), a), runs))
    alone = [final_summary(client(app_url), arguments) for arguments in runs]
    # runs computing at once share the cores, one torch thread each instead of two alone (imse.app.run_workers):
    # float32 reductions (SAR's and TENT's LayerNorm gradients, the collapse meter) then round differently in the
    # last bits, so every count and prediction must be equal, and every float equal to float32 rounding
    assert_equal_to_float32_rounding(together, alone)
    assert len({json_key(s) for s in together}) == len(runs)  # the runs differ: equality is not trivial


def json_key(summary):
    return str(sorted((label, entry["mean_accuracy"]) for label, entry in summary.items()))


def family(pid) -> list[int]:
    """The server and every process under it (its run workers), alive now."""
    pids = [int(pid)]
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                pids += family(child)
    return pids


def cpu_seconds(pid):
    """CPU time of the server and its run workers (a run computes in a worker)."""
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def resident(pid) -> int:
    """Resident size of the server and its run workers together."""
    from imse.runs.memory import resident_bytes

    return sum(resident_bytes(member) for member in family(pid))


def wait_until_idle(pid, timeout=60.0):
    """True once the process uses under 10 % of a core over a 2 s window."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        before = cpu_seconds(pid)
        time.sleep(2)
        if cpu_seconds(pid) - before < 0.2:
            return True
    return False


LONG = start_args(corruptions=["fog", "contrast", "snow", "frost", "brightness"], per_domain=4000)
# the long runs' corruptions (frost's textures, snow's kernels... are cached once per process)
WARM = start_args(corruptions=["fog", "contrast", "snow", "frost", "brightness"], per_domain=64)


def close_tab_mid_run(url, pid):
    """A visitor starts a long run in the browser and closes the tab once the first batch shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 2000})
        page.goto(url)
        number = page.get_by_label("Images per domain")
        number.fill("4000")
        number.press("Tab")
        page.get_by_role("button", name="Start").click()
        page.wait_for_function("[...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes('batch'))")
        page.close()
        browser.close()
    return wait_until_idle(pid, timeout=45)


@pytest.mark.slow  # memory
def test_stopped_and_abandoned_runs_leave_no_model_or_tensor_behind():
    """Exact, in one process: whatever ends a run (the end, Stop, a closed tab), every module and tensor it
    made is garbage once it ends (the counts equal those after a finished run; mid-run they are higher)."""
    import gc
    import types

    from imse.app import ui

    def live():
        gc.collect()
        objects = gc.get_objects()
        kinds = [type(o) for o in objects]  # type(), not isinstance: some module attributes warn on __class__
        return sum(issubclass(k, torch.nn.Module) for k in kinds), sum(issubclass(k, torch.Tensor) for k in kinds)

    visitor = types.SimpleNamespace(session_hash="visitor")
    warm, long = dict(zip(START_INPUTS, WARM)), dict(zip(START_INPUTS, LONG))  # start_lab takes them by name
    for _ in ui.start_lab(**warm, request=visitor):  # warm: the corruptions' per-process caches
        pass
    finished = live()
    run = ui.start_lab(**long, request=visitor)
    next(run)
    during = live()
    ui.stop_lab(visitor)
    list(run)
    after_stop = live()
    run = ui.start_lab(**long, request=visitor)
    next(run)
    ui.end_session(visitor)
    list(run)
    after_closed_tab = live()
    assert during[0] > finished[0] and during[1] > finished[1]  # the count sees a run's models and tensors
    assert after_stop == finished and after_closed_tab == finished
    assert ui.RUNS.active() == 0


@pytest.mark.slow  # browser and memory
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_stop_and_a_closed_tab_end_the_run_and_memory_returns(app):
    """The served app: Stop and a closed tab end the run (the server and its workers go idle), and their
    resident size comes back to where identical warm runs left it. Resident size wanders by a few percent between
    identical runs (allocator arenas), so the baseline is the larger of a finished and an abandoned warm run."""
    from playwright.sync_api import sync_playwright

    process, url = app
    with sync_playwright() as p:  # a page visit loads the Teach tab's model and samples (cached once)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")
        browser.close()
    final_summary(client(url), WARM)  # warm: imports, kernels, caches
    assert wait_until_idle(process.pid)
    warm_finished = resident(process.pid)
    assert close_tab_mid_run(url, process.pid)
    baseline = max(warm_finished, resident(process.pid))

    final_summary(client(url), WARM)  # a finished run
    assert wait_until_idle(process.pid)
    after_finished = resident(process.pid)

    c = client(url)  # Stop: the run ends at its next batch and gives its memory back
    job = c.submit(*LONG, api_name="/start")
    deadline = time.time() + 60
    while time.time() < deadline and not job.outputs():
        time.sleep(0.2)
    assert job.outputs(), "no update arrived"
    c.predict(api_name="/stop")
    assert wait_until_idle(process.pid, timeout=30), "the run kept computing after Stop"
    after_stop = resident(process.pid)

    assert close_tab_mid_run(url, process.pid), "the run kept computing after its tab was closed"
    after_close = resident(process.pid)
    for label, value in (("finished", after_finished), ("stopped", after_stop), ("closed tab", after_close)):
        # identical runs leave 892-951 MiB (6.6 % apart, no trend); a run's own state is +90-450 MiB mid-run, so
        # 10 % still catches keeping one, and the exact object count above catches any leak
        assert value <= 1.10 * baseline, f"after a {label} run: {value / 2**20:.0f} MiB vs {baseline / 2**20:.0f} MiB"


def test_no_path_from_the_api_reaches_the_servers_files(app_url, tmp_path):
    import httpx
    from gradio_client.exceptions import AppError

    for path in ("/etc/passwd", str(ROOT / "app.py")):
        for route in ("gradio_api/file=", "file="):
            response = httpx.get(app_url + route + path, timeout=10)
            assert response.status_code != 200 or "root:" not in response.text and "gr.Blocks" not in response.text
    for backbone in ("/etc/passwd", "../../weights.pth", "vit_base_patch16_224"):  # untagged: other weights
        # Gradio's dropdown refuses it first; imse.ui refuses it again for direct callers
        with pytest.raises(AppError, match="unknown backbone|not in the list of choices|is not a timm tag"):
            client(app_url).predict(*start_args(backbone=backbone), api_name="/start")
    api = client(app_url).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/start", "/stop", "/preset"}  # the Teach tab's events are not an API
    from imse.data.upload_files import UploadLimits

    big = tmp_path / "big.zip"  # past the largest upload the server takes (the Lab's zip limit), sparse on disk
    big.write_bytes(b"PK\x03\x04")
    os.truncate(big, int(UploadLimits.from_environment().max_bytes) + 2**20)
    with big.open("rb") as handle:
        response = httpx.post(app_url + "gradio_api/upload", files={"files": handle}, timeout=60)
    assert response.status_code == 413  # refused by the server before any code of ours sees it


@pytest.mark.slow  # timing
def test_limits_time_per_run_and_queue_size():
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client.exceptions import AppError

    process, url = launch_app(IMSE_MAX_RUN_SECONDS=4, IMSE_MAX_QUEUE=1, IMSE_MAX_CONCURRENT_RUNS=1)
    try:
        capped = client(url).predict(*LONG, api_name="/start")
        assert "stopped at the 4 s limit" in output(capped, "status")
        table, download = output(capped, "results"), output(capped, "download")
        assert table["data"] and Path(download).suffix == ".zip"  # the results so far, downloadable

        def attempt(_):
            try:
                client(url).predict(*LONG, api_name="/start")
                return "ran"
            except AppError as error:
                return str(error)
            except Exception as error:  # the client reports a full queue with its own exception types
                return f"{type(error).__name__}: {error}"

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(attempt, range(4)))
        assert outcomes.count("ran") >= 1
        assert any("queue" in outcome.lower() and "full" in outcome.lower() for outcome in outcomes), outcomes
    finally:
        stop_app(process)


def test_the_labs_settings_widgets_show_what_labconfig_declares(monkeypatch):
    """Each settings widget's label, limits and choices are its LabConfig declaration's; /start and the story
    buttons take exactly the declared settings (and show_source, and the upload). Builds the app's Blocks, serves
    nothing."""
    from imse.runs.lab_config import lab_settings_declared

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(ROOT))
    app = __import__("app")
    declared = lab_settings_declared()
    for name, setting in declared.items():
        widget = app.widgets[name]  # the Lab's settings widgets, by name
        assert widget.label == setting.label, name
        if setting.kind == "whole":  # a real's limits are validate's to say (its lower one may be open)
            assert [widget.minimum, widget.maximum, widget.precision] == [setting.low, setting.high, 0], name
        if setting.choices is not None:
            assert [value for _, value in widget.choices] == list(setting.choices()), name
    start = app.demo.get_api_info()["named_endpoints"]["/start"]["parameters"]
    later = ("precision", "upload", "upload_streams", "upload_labels")  # each added after /start was published
    expected = [*(name for name in declared if name not in later), "show_source", *later]
    assert [p["parameter_name"] for p in start] == expected


@pytest.mark.slow  # timing: imports in fresh interpreters
def test_importing_the_app_costs_little_more_than_its_libraries_and_touches_no_network():
    """With the hub unreachable and HF_HUB_OFFLINE unset, ``import app`` makes no network connection (the hub is
    probed when the first page loads) and costs ≤ 1.2× importing torch, timm, gradio and plotly (medians of three
    alternating fresh interpreters)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    probe = (
        "import sys, time\n"
        "connects = []\n"
        "sys.addaudithook(lambda event, args: connects.append(args) if event == 'socket.connect' else None)\n"
        "started = time.perf_counter()\n"
        "{imports}\n"
        "print(time.perf_counter() - started, len(connects))\n"
    )

    def seconds(imports: str) -> tuple[float, int]:
        done = subprocess.run(
            [sys.executable, "-c", probe.format(imports=imports)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        took, connects = done.stdout.split()
        return float(took), int(connects)

    libraries, app = [], []
    for _ in range(3):
        libraries.append(seconds("import torch, timm, gradio, plotly")[0])
        took, connects = seconds("import app")
        assert connects == 0
        app.append(took)
    ratio = statistics.median(app) / statistics.median(libraries)
    print(f"import app {statistics.median(app):.2f} s, libraries {statistics.median(libraries):.2f} s: {ratio:.2f}x")
    assert ratio <= 1.2
