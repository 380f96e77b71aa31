"""The Lab's download is something the library can load: its code and bank go into a fresh model."""

import json
import zipfile

import torch

from imse.app.lab_results import export_run
from imse.core.codes import load_code
from imse.core.methods import create
from imse.data.models import BUILTIN, create_backbone
from imse.runs.lab import LabConfig, run_lab


def test_the_exported_code_and_bank_load_into_a_fresh_model_and_reproduce_the_final_predictions(tmp_path):
    config = LabConfig(corruptions=("fog", "contrast"), per_domain=128, methods=("IMSE + retrieval (top-1)", "Source"))
    *_, state = run_lab(config, min_interval=0.0, thumbnails=8)
    archive = export_run(state, tmp_path)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "run")
        records = json.loads(zf.read("records.json"))
    assert len(records["records"]) == state.batch

    fresh = create("imse", create_backbone(BUILTIN))
    code = load_code(tmp_path / "run" / "spectral_code.safetensors", fresh.model)
    adapted = state.final_methods["IMSE + retrieval (top-1)"]
    assert code  # every spectral layer's S
    x = state.thumbnails["corrupted"].float() / 255  # the last batch's first images
    with torch.no_grad():
        assert fresh.model(x).argmax(-1).tolist() == state.thumbnails["after"]
        assert torch.allclose(fresh.model(x), adapted.model(x), atol=1e-6)

    fresh.load_bank(tmp_path / "run" / "domain_bank.safetensors")
    assert len(fresh.bank) == len(adapted.bank) >= 2
    for ours, theirs in zip(fresh.bank.entries, adapted.bank.entries):
        assert torch.equal(ours.descriptor.mean, theirs.descriptor.mean)
        assert all(torch.equal(ours.code[name], theirs.code[name]) for name in theirs.code)
