"""The app end to end: launched as users launch it (python app.py), driven through gradio_client and a browser."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["builtin", "continual", ["fog", "gaussian_noise", "contrast"], 5, ["IMSE", "Source"], 64, 128, 0, 7e-4, 50.0]
SHORT += [0.05, "cpu", False]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"app exited: {process.stdout.read()}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 90 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_streamed_run_matches_the_cli(app_url):
    from imse.bench import run_bench

    job = client(app_url).submit(*SHORT, api_name="/start")
    updates = list(job)
    final = job.outputs()[-1]
    assert len(updates) >= 2  # streamed, not one final answer
    assert "finished" in final[0]
    table = final[6]["value"] if "value" in final[6] else final[6]
    headers, rows = table["headers"], table["data"]
    assert headers == ["method", "fog-5", "gaussian_noise-5", "contrast-5", "mean"]
    assert Path(final[7]).suffix == ".zip" and Path(final[7]).stat().st_size > 0
    cli = run_bench(
        methods=("imse", "source"),
        scenario="continual",
        corruptions=["fog", "gaussian_noise", "contrast"],
        per_domain=128,
        batch_size=64,
        seeds=(0,),
        lrs={"imse": 7e-4},
        progress=False,
    )
    for row, name in zip(rows, ("imse", "source")):
        expected = [round(100 * d["accuracy"], 1) for d in cli["methods"][name]["domains"]]
        assert row[1:4] == expected, (row, expected)


def test_cancel_stops_the_run_and_the_app_keeps_working(app_url):
    from gradio_client.utils import Status

    c = client(app_url)
    long_run = list(SHORT)
    long_run[2], long_run[6] = ["fog", "contrast", "snow", "frost", "brightness"], 2000
    job = c.submit(*long_run, api_name="/start")
    deadline = time.time() + 60
    while time.time() < deadline and len(job.outputs()) < 1:
        time.sleep(0.2)
    assert job.outputs(), "no update arrived"
    job.cancel()
    time.sleep(2)
    assert job.status().code in (Status.CANCELLED, Status.FINISHED) and "finished" not in job.outputs()[-1][0]
    started = time.time()
    after = c.submit(*SHORT, api_name="/start")
    assert "finished" in after.result()[0]
    assert time.time() - started < 120


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({5: 0}, "batch size|minimum value 1"),  # the widget's own range check answers first
        ({5: 100_000}, "batch size|maximum value"),
        ({6: 0}, "images per domain|minimum value 1"),
        ({6: 10**7}, "images"),
        ({4: []}, "at least one method"),
        ({2: []}, "at least one corruption"),
        ({10: -1.0}, "τ"),
    ],
)
def test_bad_input_is_a_readable_message_and_the_app_keeps_working(app_url, change, message):
    from gradio_client.exceptions import AppError

    c = client(app_url)
    arguments = list(SHORT)
    for index, value in change.items():
        arguments[index] = value
    with pytest.raises(AppError, match=message) as raised:
        c.predict(*arguments, api_name="/start")
    assert "Traceback" not in str(raised.value)


def test_teach_helpers_on_a_real_image_and_bad_uploads(tmp_path):
    import gradio as gr
    from PIL import Image

    from imse import teach, ui
    from imse.spectral import spectral_layers

    backbone = teach.spectral_backbone("builtin")
    layer = next(iter(spectral_layers(backbone)))
    image, _ = teach.sample_images()[0]
    cosines = torch.tensor(teach.expert_cosines(backbone, layer, image))
    torch.testing.assert_close(cosines, torch.eye(len(cosines)), atol=1e-4, rtol=0)
    base = teach.predict(backbone, image)
    assert teach.predict(backbone, image, layer, 0, 1.0) == pytest.approx(base)
    assert teach.predict(backbone, image, layer, 0, 3.0) != pytest.approx(base)
    assert torch.equal(spectral_layers(backbone)[layer].S, spectral_layers(backbone)[layer].S0)  # restored

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (6000, 6000)).save(bomb)  # tiny file, 36 million pixels
    big = tmp_path / "big.bmp"
    big.write_bytes(b"BM" + b"\0" * (teach.MAX_UPLOAD_BYTES + 1))
    for path, message in ((text, "not an image"), (bomb, "pixels"), (big, "MB")):
        with pytest.raises(gr.Error, match=message):
            ui.teach_predict("builtin", layer, None, str(path), 0, 1.0)
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    text_out, *_ = ui.teach_predict("builtin", layer, None, str(good), 0, 1.0)
    assert "your image" in text_out


CHROMIUM = shutil.which("chromium")


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
        page.goto(app_url, wait_until="networkidle")
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
