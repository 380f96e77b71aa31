"""Your images and your ViT, through the Lab, the API and the CLI: a run on an upload gives the records bench gives
on the same files, seed and settings (every layout, labelled or not); any timm ViT tag runs from the hub's cache
and other architectures are refused with a sentence; every cost has an estimate; uploads go with their session."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_equal_to_float32_rounding
from PIL import Image
from served import client, output
from test_uploads import FOLDER, png

from imse.data.fashion_mnist import load_shipped
from imse.runs.bench import run_bench
from imse.runs.lab import LabConfig, run_lab

TINY_TAG = "deit_tiny_patch16_224.fb_in1k"  # a timm ViT no card lists (5.7 M parameters)
RUN = dict(methods=("IMSE", "Source"), per_domain=16, batch_size=16, seed=0, scenario="continual", severity=3)


def shifted_zip(path: Path, layout: str, count: int = 48) -> Path:
    """Fashion-MNIST test images in three domains that differ (day as they are, dusk darker, night darker and
    noisier), laid out as ``layout``."""
    images, labels = load_shipped("test")
    generator = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            domain = ("day", "dusk", "night")[i % 3]
            image = images[i].astype(float) * {"day": 1.0, "dusk": 0.55, "night": 0.35}[domain]
            if domain == "night":
                image += generator.normal(0, 25, image.shape)
            folder = {"images": "", "CLASS/images": f"{FOLDER[labels[i]]}/", "DOMAIN/images": f"{domain}/",
                      "DOMAIN/CLASS/images": f"{domain}/{FOLDER[labels[i]]}/"}[layout]  # fmt: skip
            archive.writestr(f"{folder}{i:03d}.png", png(np.clip(image, 0, 255).astype(np.uint8)))
    return path


def bench_on(path: Path, labelled: bool = True) -> dict:
    """``python -m imse bench --data PATH`` with the Lab run's settings (the CLI's defaults are the Lab's)."""
    return run_bench(data=str(path), methods=("imse", "source"), scenario=RUN["scenario"], severity=RUN["severity"],
                     per_domain=RUN["per_domain"], batch_size=RUN["batch_size"], seeds=(RUN["seed"],),
                     unlabelled=not labelled, progress=False)  # fmt: skip


def same_records(lab_summary: dict, bench_result: dict) -> None:
    """The Lab's summary equals bench's, method by method: every domain's readouts and every batch's count."""
    bench = bench_result["per_seed"][0]["methods"]
    for lab_label, name in (("IMSE", "imse"), ("Source", "source")):
        lab, cli = dict(lab_summary[lab_label]), dict(bench[name])
        for entry in (lab, cli):
            for key in ("seconds", "images_per_s", "num_trainable", "skipped_updates"):
                entry.pop(key, None)
        assert_equal_to_float32_rounding(lab, cli, lab_label)


@pytest.mark.slow  # two more runs each (the default suite has the served pair below: labelled and not)
@pytest.mark.parametrize("layout", ["images", "CLASS/images"])
def test_a_lab_run_on_one_domain_gives_the_records_bench_gives(layout, tmp_path):
    """The two single-domain layouts (flat: unlabelled; class folders: labelled), the Lab's run loop in process
    (what a worker runs for Start) against bench on the same zip."""
    from imse.app.your_images import prepared_data

    path = shifted_zip(tmp_path / "up.zip", layout)
    data = prepared_data([str(path)], "builtin", "folders", "a-session")
    *_, state = run_lab(LabConfig(**RUN, data=data), min_interval=0.0, thumbnails=1)
    assert state.labelled == (layout == "CLASS/images") and state.images == 16
    same_records(state.summary, bench_on(path))


@pytest.mark.parametrize("layout", ["DOMAIN/CLASS/images", "DOMAIN/images"])
def test_a_served_run_on_an_upload_gives_the_records_bench_gives(layout, app_url, tmp_path):
    """/start takes the upload through gradio_client's handle_file; the run's download holds bench's records."""
    from gradio_client import handle_file

    path = shifted_zip(tmp_path / "up.zip", layout)
    job = client(app_url).submit(**{**RUN, "methods": list(RUN["methods"])}, upload=[handle_file(str(path))],
                                 upload_streams="as-is", api_name="/start")  # fmt: skip
    final = job.result()
    labelled = layout == "DOMAIN/CLASS/images"
    status = output(final, "status")
    assert status.startswith("**finished: 48 images")
    table = output(final, "results")
    assert table["headers"][:4] == ["method", "day", "dusk", "night"]
    with zipfile.ZipFile(output(final, "download")) as archive:
        run = json.loads(archive.read("records.json"))
    same_records(run["summary"], bench_on(path, labelled))
    if labelled:
        assert "Source" in status and "no labels" not in status
    else:  # said plainly: the finish sentence, the table, the zip
        assert "Your images have no labels, so no accuracy is known: IMSE agreed with Source on" in status
        assert table["headers"][4:7] == ["mean agreement with Source", "confidence (%)", "entropy (nats)"]
        assert run["labels"].startswith("none: the images had no labels")


def test_an_upload_refused_reaches_the_visitor_as_its_sentence(app_url, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "up.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(Exception, match="up.zip is named .zip but is not a zip archive"):
        client(app_url).predict(**{**RUN, "methods": ["IMSE"]}, upload=[handle_file(str(bad))], api_name="/start")


def test_the_page_says_what_an_upload_holds_before_anything_runs(tmp_path):
    from imse.app.your_images import check_upload

    said, preview = check_upload([str(shifted_zip(tmp_path / "up.zip", "DOMAIN/CLASS/images"))], "builtin", "folders")
    assert said == "**Found:** 48 images in 3 domains (day, dusk, night), 10 classes matched to the model's."
    # as the model will see them: its 32 px (drawn at 112 so that a pixel is seen), spread over the domains
    assert [caption.split(" · ")[0] for _, caption in preview] == ["day", "day", "dusk", "dusk", "night", "night"]
    assert all(image.size == (112, 112) for image, _ in preview)
    said, preview = check_upload([str(shifted_zip(tmp_path / "flat.zip", "images"))], "builtin", "none")
    assert said.endswith("no labels. No labels: the Lab reports agreement with Source instead of accuracy.")
    refused, nothing = check_upload([str(tmp_path / "missing.zip")], "builtin", "folders")
    assert refused == "**Refused:** missing.zip could not be read" and nothing == []


def test_an_upload_goes_with_its_session_and_after_its_age(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from imse.app import serving, ui
    from imse.app.your_images import prepared_data

    data = prepared_data([str(shifted_zip(tmp_path / "up.zip", "images"))], "builtin", "folders", "visitor")
    folder = Path(data.removeprefix("upload:"))
    assert folder.parent == serving.upload_dir("visitor") and (folder / "manifest.json").is_file()
    ui.end_session(SimpleNamespace(session_hash="visitor"))  # the tab closed
    assert not folder.parent.exists()
    other = Path(prepared_data([str(tmp_path / "up.zip")], "builtin", "folders", "other").removeprefix("upload:"))
    serving.prune_uploads(max_age=3600)
    assert other.is_dir()  # in use
    monkeypatch.setattr(serving.time, "time", lambda: 1e12)  # long after its last use
    assert serving.prune_uploads(max_age=3600) >= 1 and not other.parent.exists()


@pytest.fixture
def tiny_tag_in_cache(tmp_path, monkeypatch):
    """deit_tiny's tag with random weights in a local Hugging Face cache: a ViT tag no card lists, offline."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / f"models--timm--{TINY_TAG}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    torch.manual_seed(0)
    save_file(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return snapshot / "model.safetensors"


@pytest.mark.slow  # a 224-px ViT's SVDs and steps on 2 cores (~10 s); its refusals and cost stay in the default set
def test_any_timm_vit_tag_runs_on_your_images_from_the_hub_cache(tiny_tag_in_cache, tmp_path):
    from imse.app.your_images import prepared_data

    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as archive:
        for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
            from imse.core.resources import asset_path

            buffer = io.BytesIO()
            Image.open(asset_path("samples", f"{name}.jpg")).convert("RGB").save(buffer, "JPEG")
            archive.writestr(f"{('a', 'b')[i % 2]}/{name}.jpg", buffer.getvalue())
    data = prepared_data([str(photos)], TINY_TAG, "folders", "a-session")
    config = LabConfig(backbone=TINY_TAG, data=data, methods=("IMSE",), per_domain=2, batch_size=2)
    *_, state = run_lab(config, min_interval=0.0, thumbnails=1)
    assert state.finished and state.images == 4 and not state.labelled
    assert list(state.summary) == ["Source", "IMSE"]  # without labels Source runs too: agreement is measured on it
    assert state.class_names[:2] == ["tench", "goldfish"]  # its classes, from timm's own ImageNet names
    assert [d["name"] for d in state.summary["IMSE"]["domains"]] == ["a", "b"]


@pytest.mark.parametrize(
    ("tag", "sentence"),
    [
        ("swin_tiny_patch4_window7_224.ms_in1k", "IMSE Lab adapts ViTs; swin_tiny_patch4_window7_224.ms_in1k is a Swin "
         "Transformer"),
        ("vit_smal_patch16_224.augreg_in21k_ft_in1k", "timm has no weights tagged 'vit_smal_patch16_224.augreg_in21k_"
         "ft_in1k'; the closest tags: vit_small_patch16_224.augreg_in21k_ft_in1k"),
        ("vit_large_patch16_224.augreg_in21k_ft_in1k", "vit_large_patch16_224.augreg_in21k_ft_in1k has 304.3 M "
         "parameters; this server takes ViTs of at most 100 M (IMSE_MAX_BACKBONE_PARAMS)"),
        ("vit_base_patch16_224.dino", "vit_base_patch16_224.dino has no classifier: IMSE adapts a classifier"),
        ("../../etc/passwd", "'../../etc/passwd' is not a timm tag"),
    ],
)  # fmt: skip
def test_other_architectures_and_unknown_tags_are_refused_before_any_download(tag, sentence):
    import gradio as gr

    from imse.app import ui

    with pytest.raises(gr.Error) as refused:
        ui.make_config(backbone=tag)
    assert refused.value.message.startswith("backbone: ") and sentence in refused.value.message


def test_the_size_limit_is_the_hosts(monkeypatch):
    from imse.data import vit_tags

    monkeypatch.setenv("IMSE_MAX_BACKBONE_PARAMS", "5000000")
    vit_tags.inspect_vit.cache_clear()
    try:
        with pytest.raises(ValueError, match=f"{TINY_TAG} has 5.7 M parameters; this server takes ViTs of at most 5 M"):
            vit_tags.inspect_vit(TINY_TAG)
    finally:
        vit_tags.inspect_vit.cache_clear()


def test_every_run_has_a_cost_scaled_from_flops_and_declared_passes(monkeypatch):
    """A backbone no table lists costs the nearest measured architecture's steps times the FLOPs ratio; a method no
    table lists (registered here) costs its declared passes, each a third of TENT's step."""
    from imse.app import run_cost
    from imse.core import methods as registry
    from imse.core.methods.tent import Tent
    from imse.data.vit_tags import forward_gflops

    small = run_cost._measured("cpu")["vit_small_patch16_224"]
    ratio = forward_gflops(TINY_TAG) / forward_gflops("vit_small_patch16_224")
    assert run_cost.seconds_per_image(TINY_TAG, "imse", "cpu") == pytest.approx(small["imse"] * ratio / 64)

    class Twice(Tent):
        name, label, step_passes = "twice", "Twice", 5.0

    monkeypatch.setitem(registry.METHODS, "twice", Twice)
    assert run_cost.seconds_per_image(TINY_TAG, "twice", "cpu") == pytest.approx(small["tent"] / 3 * 5 * ratio / 64)


def test_a_weights_download_moves_the_labs_progress_bar():
    from imse.data.models import _relay

    seen = []
    bar = _relay(lambda done, total, what: seen.append((done, total, what)), "Downloading x's weights")(
        total=300, disable=True
    )
    for _ in range(3):
        bar.update(100)
    bar.close()
    assert seen == [(100, 300, "Downloading x's weights"), (200, 300, "Downloading x's weights"),
                    (300, 300, "Downloading x's weights")]  # fmt: skip


CHROMIUM = __import__("shutil").which("chromium")


@pytest.mark.slow  # browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_browser_uploads_a_zip_sees_what_it_holds_and_a_run_on_it(app_url, tmp_path):
    """The visitor's path: Images → yours, a zip through the page's file input (Playwright's set_input_files), the
    summary and the preview before anything runs, then Start: a streamed run on the three domains and its finish
    sentence."""
    from playwright.sync_api import sync_playwright

    path = shifted_zip(tmp_path / "up.zip", "DOMAIN/CLASS/images")
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.on("request", lambda r: None if r.url.startswith((app_url, "data:", "blob:")) else outside.append(r.url))
        page.goto(app_url)
        page.get_by_label("yours (upload a .zip or images)").check()
        page.locator("#your-images input[type=file]").set_input_files(str(path))
        found = page.locator("#upload-found")
        found.filter(has_text="Found:").wait_for(timeout=120_000)
        said = found.inner_text()
        previews = page.locator("#upload-preview img").count()
        page.get_by_label("Images per domain").fill("16")
        page.get_by_label("Batch size").fill("16")
        page.get_by_label("Batch size").press("Tab")
        page.get_by_role("button", name="Start", exact=True).click()
        page.wait_for_function(
            "[...document.querySelectorAll('.gtitle')].some(t => t.textContent.includes('batch 1/3'))", timeout=120_000
        )  # streamed: the first update comes before the end
        page.get_by_text("finished:").wait_for(timeout=300_000)
        status = page.get_by_text("finished:").locator("xpath=..").inner_text()  # the bold part and the sentence
        titles = page.eval_on_selector_all(".gtitle", "els => els.map(e => e.textContent)")
        browser.close()
    assert said == "Found: 48 images in 3 domains (day, dusk, night), 10 classes matched to the model's."
    assert previews == 6
    assert status.startswith("finished: 48 images in") and "over 48 images" in status
    assert any("The current batch: night" in t for t in titles)
    assert outside == []


@pytest.mark.slow  # timing: the bound, on 2 cores
def test_decoding_and_preparing_1000_uploaded_photos_takes_at_most_5_s(tmp_path):
    import random
    import statistics
    import time

    from imse.core.resources import asset_path
    from imse.data.models import model_view
    from imse.data.uploads import prepare_upload

    photos = [Image.open(asset_path("samples", f"{n}.jpg")).convert("RGB") for n in ("astronaut", "chelsea", "coffee",
                                                                                       "rocket")]  # fmt: skip
    chance = random.Random(0)
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(1000):  # 224-px photos: crops of the four sample photos
            photo = photos[i % 4]
            side = chance.randint(min(photo.size) // 2, min(photo.size))
            x, y = chance.randint(0, photo.width - side), chance.randint(0, photo.height - side)
            buffer = io.BytesIO()
            photo.crop((x, y, x + side, y + side)).resize((224, 224)).save(buffer, "JPEG", quality=90)
            archive.writestr(f"photos/{i:04d}.jpg", buffer.getvalue())
    view = model_view("vit_small_patch16_224.augreg_in21k_ft_in1k")
    seconds = []
    for attempt in range(3):
        started = time.perf_counter()
        upload = prepare_upload([path], view, tmp_path / f"session{attempt}")
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    prepare_upload([path], view, tmp_path / "session0")
    again = time.perf_counter() - started
    print(f"1000 photos: {statistics.median(seconds):.2f} s (median of 3: {seconds}); the same again {again:.3f} s")
    assert len(upload) == 1000 and statistics.median(seconds) <= 5.0 and again < 0.5
