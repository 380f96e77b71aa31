"""Numerical edge cases a public app will see: batches of 1 and 2, identical images, an all-black batch,
extreme severities in a row — no NaN, no crash, and every method recovers on the clean data that follows."""

import pytest
import torch

from imse.core.methods import create
from imse.data.builders import source_images
from imse.data.corruptions import corrupt
from imse.data.fashion_mnist import BuiltinSource
from imse.data.models import create_backbone
from imse.runs.lab import LabConfig
from imse.runs.soak import non_finite_paths

# the app's settings for the built-in backbone (lab defaults): IMSE lr 7e-4, λ_dm 50, τ 0.05
LAB = LabConfig()
METHODS = {
    "imse": ("imse", {"lr": LAB.imse_lr, "lambda_dm": LAB.lambda_dm}),
    "imse-top1": ("imse", {"lr": LAB.imse_lr, "lambda_dm": LAB.lambda_dm, "retrieval": "top1"}),
    "sar": ("sar", {}),
    "tent": ("tent", {}),
}


def hostile_batches(images: torch.Tensor):
    """Batch sizes 1 and 2, all-identical images, all-black, all-white, and severity-5 corruptions in a row."""
    generator = torch.Generator().manual_seed(0)
    yield torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # all black
    yield torch.zeros(1, 3, 32, 32, dtype=torch.uint8)  # one black image
    yield torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)  # all white
    yield images[:1].repeat(16, 1, 1, 1)  # sixteen identical images
    yield images[:1]  # batch of one
    for i, name in enumerate(("gaussian_noise", "contrast", "impulse_noise", "fog", "brightness", "snow")):
        chunk = images[2 * i : 2 * i + 2 + 30 * (i % 2)]  # alternately 2 and 32 images
        yield corrupt(chunk, name, 5, generator=generator)


@pytest.fixture(scope="module")
def data():
    source = BuiltinSource()
    images, labels = source.load(range(1024))
    return images, labels, source


@pytest.mark.parametrize("label", list(METHODS))
def test_hostile_batches_never_give_nan_and_the_model_recovers_on_clean_data(data, label):
    images, labels, source = data
    name, overrides = METHODS[label]
    if overrides.get("retrieval"):
        overrides = {**overrides, "source_images": source_images("builtin", source)}
    method = create(name, create_backbone("builtin"), **overrides)
    reference = create("source", create_backbone("builtin"))
    for batch in hostile_batches(images[512:]):
        logits = method(batch.float() / 255)
        assert torch.isfinite(logits).all(), f"{label}: non-finite logits on a batch of {len(batch)}"
        assert non_finite_paths(method.last_record) == [], method.last_record
        assert all(torch.isfinite(p).all() for p in method.trainable.values())
    correct = {"adapted": 0, "source": 0}
    for start in range(0, 256, 64):  # the clean domain that follows
        x, y = images[start : start + 64].float() / 255, labels[start : start + 64]
        correct["adapted"] += int((method(x).argmax(-1) == y).sum())
        correct["source"] += int((reference(x).argmax(-1) == y).sum())
    adapted, plain = 100 * correct["adapted"] / 256, 100 * correct["source"] / 256
    assert adapted >= plain - 5, f"{label}: {adapted:.1f} % on clean data after the hostile batches vs {plain:.1f} %"


@pytest.mark.slow  # soak
def test_soak_gradual_stream_no_nan_flat_memory_bank_within_capacity(tmp_path):
    """`python -m imse soak` on one corruption's 9 gradual domains (the README reports the full 135)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "imse", "soak", "--corruptions", "fog", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["domains"] == 9 and result["images"] == 9 * 64
    assert result["non_finite_count"] == 0
    assert result["rss_growth"] <= 0.05
    assert 1 <= result["bank_max"] <= result["bank_capacity"]
