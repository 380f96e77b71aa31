"""A ZeroGPU Space as it really runs: the real `spaces` package (0.51.3) forks its worker, pickles the run's
arguments and yields through its queues and asks a scheduler for each call's duration.

What stands in (``tests/zerogpu_standin.py``): the device API (a scheduler on 127.0.0.1 answering
``/startup-report``, ``/schedule``, ``/allow``, ``/release`` in the documented shapes), and the GPU itself — the
worker's two CUDA-only start steps (``spaces.zero.torch.init`` and ``move``) are replaced and the GPU call computes
on the CPU (``imse.app.zerogpu.GPU_DEVICE``). The fork, the queues, the pickling, the client's calls and its
refusals are the package's own.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from imse.app import serving, zerogpu
from imse.runs.defaults import PAPER_BACKBONE, lab_settings
from imse.runs.lab import LabConfig

ROOT = Path(__file__).resolve().parent.parent


# -- the size of a GPU call -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["builtin", PAPER_BACKBONE])
def test_the_default_gpu_run_requests_at_most_a_minute(backbone):
    assert zerogpu.request_seconds(LabConfig(**lab_settings("default", backbone))) <= 60


def test_every_story_fits_one_call_of_a_visitor_without_sign_in():
    for backbone in ("builtin", PAPER_BACKBONE):
        for preset in ("collapse", "bank", "gradual"):
            zerogpu.check_fits(LabConfig(**lab_settings(preset, backbone)))  # raises if not


def test_the_request_grows_with_the_images_and_the_methods():
    small = LabConfig(per_domain=2500, methods=("IMSE",))
    assert zerogpu.request_seconds(small) < zerogpu.request_seconds(LabConfig(per_domain=5000, methods=("IMSE",)))
    assert zerogpu.request_seconds(small) < zerogpu.request_seconds(LabConfig(methods=("IMSE", "TENT")))
    base = LabConfig(backbone=PAPER_BACKBONE, data="imagenette", per_domain=2500, methods=("IMSE",))
    assert zerogpu.request_seconds(small) < zerogpu.request_seconds(base)  # ViT-B costs more than the built-in model


def test_a_run_too_large_for_one_call_is_refused_with_the_size_that_fits(monkeypatch):
    import gradio as gr

    monkeypatch.setenv("IMSE_ZEROGPU_MAX_SECONDS", "60")
    config = LabConfig(backbone=PAPER_BACKBONE, data="imagenette", per_domain=2500, methods=("IMSE", "TENT"))
    with pytest.raises(gr.Error) as refused:
        zerogpu.check_fits(config)
    message = refused.value.message
    assert "at most 60 s" in message and "Device: cpu" in message
    fits = int(message.split("at most ")[2].split(" images per domain")[0].replace(",", ""))
    zerogpu.check_fits(LabConfig(**{**config.__dict__, "per_domain": fits}))  # the size it names fits ...
    with pytest.raises(gr.Error):  # ... and is the largest that does
        zerogpu.check_fits(LabConfig(**{**config.__dict__, "per_domain": fits + 1}))


def _wait_for_stop(token: serving.StopToken, started) -> None:
    started.set()
    deadline = time.time() + 20
    while not token.is_set() and time.time() < deadline:
        time.sleep(0.01)
    os._exit(0 if token.is_set() else 1)


def test_a_stop_token_crosses_a_fork_made_before_it_was_set():
    runs = serving.SessionRuns()
    token = runs.start("visitor")
    token = pickle.loads(pickle.dumps(token))  # as the worker gets it: through a queue
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_wait_for_stop, args=(token, started))
    child.start()
    assert started.wait(20)
    assert runs.stop("visitor") == 1
    child.join(10)
    assert child.exitcode == 0  # the child saw Stop
    runs.finish("visitor", token)
    assert not token.is_set() and runs.active() == 0


# -- the served app through the real `spaces` worker ------------------------------------------------------------

SMALL = dict(
    backbone="builtin",
    scenario="continual",
    corruptions=["fog", "contrast"],
    severity=3,
    methods=["IMSE + retrieval (top-1)", "Source"],
    batch_size=64,
    per_domain=128,
    seed=0,
    imse_lr=lab_settings()["imse_lr"],
    lambda_dm=lab_settings()["lambda_dm"],
    tau=0.05,
    rounds=3,
    device="cuda",
    show_source=False,
    precision="fp32",  # a client may leave it out, and what follows (tests/test_precision.py)
    upload=None,  # the backbone's own data
    upload_streams="as-is",
    upload_labels="folders",
)


def _arguments(**changes) -> list:
    from imse.app.ui import START_INPUTS

    values = {**SMALL, **changes}
    assert values.keys() == set(START_INPUTS)  # an input /start gains must be added here, by name
    return [values[name] for name in START_INPUTS]


def _output(outputs, name: str):
    from imse.app.ui import START_OUTPUTS

    value = outputs[START_OUTPUTS.index(name)]
    return value["value"] if isinstance(value, dict) and "value" in value else value


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """``app.py`` as a ZeroGPU Space runs it, against the stand-in scheduler; (process, url, scheduler)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from zerogpu_standin import LAUNCHER, DeviceAPI

    with DeviceAPI(quota=600, largest=120) as api, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        env.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=api.url, GRADIO_HEARTBEAT_INTERVAL="1")
        env["IMSE_SVD_CACHE"] = str(tmp_path_factory.mktemp("svd"))
        log = tmp_path_factory.mktemp("log") / "app.log"
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=ROOT, env=env, stdout=log.open("w"),
                                   stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                time.sleep(0.5)
        yield process, f"http://127.0.0.1:{port}/", api
        process.terminate()
        process.wait(20)
        for path, params in api.calls:  # the package's worker is a daemon of the server: it outlives a SIGTERM
            if path == "/allow":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(params["pid"]), signal.SIGKILL)


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _worker_pid(api) -> int:
    return int(next(p["pid"] for path, p in reversed(api.calls) if path == "/allow"))


@pytest.mark.slow  # a served app and a forked worker
def test_a_gpu_run_streams_through_the_worker_and_equals_the_same_run_in_process(space, tmp_path):
    from imse.core.codes import load_code
    from imse.core.methods import create
    from imse.data.models import BUILTIN, create_backbone

    process, url, api = space
    before = len(api.requested())
    job = _client(url).submit(*_arguments(), api_name="/start")
    updates = list(job)
    final = job.outputs()[-1]
    assert len(updates) >= 2 and "finished" in _output(final, "status")
    # it was one GPU call, of the size the run asked for, computed in another process than the server
    config = LabConfig(**{**lab_settings(), **{k: v for k, v in SMALL.items() if k not in ("show_source", "upload")}})
    config.corruptions, config.methods = tuple(config.corruptions), tuple(config.methods)
    assert api.requested()[before:] == [zerogpu.request_seconds(config)]
    assert _worker_pid(api) != process.pid
    assert ("/release", {"allowToken": f"token-{len(api.requested())}", "fail": "false"}) in api.calls
    # the same run on the CPU, in the server process: the same table
    alone = _client(url).predict(*_arguments(device="cpu"), api_name="/start")
    assert _output(alone, "results")["data"] == _output(final, "results")["data"]
    assert len(api.requested()) == before + 1  # the cpu run took no GPU call

    with zipfile.ZipFile(_output(final, "download")) as archive:
        archive.extractall(tmp_path)
        records = json.loads(archive.read("records.json"))
    assert len(records["records"]) == 4  # 2 domains x 128 images / 64
    with pytest.warns(UserWarning, match="no source images"):  # the bank comes from the file
        imse = create("imse", create_backbone(BUILTIN), retrieval="top1")
    assert load_code(tmp_path / "spectral_code.safetensors", imse.model)
    imse.load_bank(tmp_path / "domain_bank.safetensors")
    assert len(imse.bank) >= 2


@pytest.mark.slow  # a served app and a forked worker; timing
def test_stop_ends_the_run_inside_the_worker_within_a_batch(space):
    process, url, api = space
    c = _client(url)
    job = c.submit(*_arguments(corruptions=["fog", "contrast", "snow", "frost"], per_domain=3000), api_name="/start")
    deadline = time.time() + 90
    while time.time() < deadline and not job.outputs():
        time.sleep(0.1)
    assert job.outputs(), "no update arrived"
    stopped = time.time()
    c.predict(api_name="/stop")
    while not job.done() and time.time() - stopped < 30:
        time.sleep(0.05)
    ended = time.time() - stopped
    assert job.done()
    assert ended < 3.0, f"the worker went on for {ended:.1f} s after Stop (a batch takes well under 1 s)"
    assert "finished" not in _output(job.outputs()[-1], "status")
    token = f"token-{len(api.requested())}"
    assert any(path == "/release" and p["allowToken"] == token for path, p in api.calls)  # the GPU went back


@pytest.mark.slow  # a served app and a forked worker
def test_refused_requests_reach_the_visitor_as_readable_messages(space):
    from gradio_client.exceptions import AppError

    process, url, api = space
    before = len(api.requested())
    with pytest.raises(AppError, match="Too large for one GPU call|at most 120 s") as refused:
        _client(url).predict(*_arguments(per_domain=60_000), api_name="/start")
    assert "Traceback" not in str(refused.value) and "images per domain" in str(refused.value)
    assert len(api.requested()) == before  # refused before asking the scheduler

    left, api.quota = api.quota, 5  # the visitor's quota is nearly spent
    try:
        with pytest.raises(AppError, match="ZeroGPU did not start this run") as refused:
            _client(url).predict(*_arguments(), api_name="/start")
    finally:
        api.quota = left
    assert "Traceback" not in str(refused.value)
    assert len(api.requested()) == before + 1


def test_an_imse_step_on_the_cpu_works_where_cuda_is_reported_but_absent(monkeypatch):
    """A ZeroGPU Space's server process: `spaces` makes ``torch.cuda.is_available()`` say True with no GPU there;
    torch's Adam then initialises CUDA in its step, and a CPU run (or the Teach tab) failed at its first update."""
    import torch

    from imse.core.methods import create
    from imse.data.models import BUILTIN, create_backbone

    images = torch.rand(8, 3, 32, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    method = create("imse", create_backbone(BUILTIN))
    before = {name: s.detach().clone() for name, s in method.model.named_parameters() if s.requires_grad}
    method(images)
    after = dict(method.model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it stepped
    plain = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    plain.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(RuntimeError):  # what the method's own optimizer avoids
        plain.step()


def _idle(pid: int, timeout: float) -> bool:
    """True once the process uses under 10 % of a core over a 1 s window."""

    def cpu(pid):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    deadline = time.time() + timeout
    while time.time() < deadline:
        before = cpu(pid)
        time.sleep(1)
        if cpu(pid) - before < 0.1:
            return True
    return False


@pytest.mark.slow  # browser, a served app and a forked worker
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_in_the_browser_refusals_are_messages_and_a_closed_tab_ends_the_gpu_run(space, tmp_path):
    """What a ZeroGPU visitor sees: the run's device is cuda by default; a run too large for one call and a spent
    quota each give a readable message (screenshots: $IMSE_SCREENSHOTS, else the test's folder); closing the tab
    mid-run ends the run in the worker."""
    from playwright.sync_api import sync_playwright

    process, url, api = space
    shots = Path(os.environ.get("IMSE_SCREENSHOTS", tmp_path))

    def press_start(page, per_domain: int) -> None:
        number = page.get_by_label("Images per domain")
        number.fill(str(per_domain))
        number.press("Tab")
        page.get_by_role("button", name="Start").click()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        assert page.get_by_label("Device").input_value() == "cuda"
        press_start(page, 20_000)
        toast = page.locator(".toast-body").filter(has_text="GPU")
        toast.first.wait_for(timeout=30_000)
        assert "images per domain" in toast.first.inner_text()
        page.wait_for_timeout(1000)  # the toast slides in
        page.screenshot(path=shots / "zerogpu-too-large.png")
        left, api.quota = api.quota, 5
        try:
            page.reload()
            press_start(page, 128)
            toast = page.locator(".toast-body").filter(has_text="ZeroGPU did not start this run")
            toast.first.wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=shots / "zerogpu-quota-refused.png")
        finally:
            api.quota = left
        page.reload()
        press_start(page, 3000)
        page.get_by_text(re.compile(r"batch \d+/\d+")).first.wait_for(timeout=90_000)  # the status line of a run
        worker = _worker_pid(api)
        assert not _idle(worker, 2), "the worker was not computing"
        page.close()
        browser.close()
    assert _idle(worker, 30), "the worker kept computing after the tab closed"
