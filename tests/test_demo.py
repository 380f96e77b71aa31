"""What the demo shows: one place for the defaults, the story presets, the collapse readouts, the Space path."""

import io
import json
import math
import tarfile
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from PIL import Image

from imse.core.resources import asset_path
from imse.data.models import BUILTIN
from imse.runs.collapse import CollapseMeter
from imse.runs.defaults import PAPER_BACKBONE, PRESETS, default_backbone, lab_settings, run_methods, tuned_settings
from imse.runs.lab import LabConfig, run_lab, validate

ROOT = Path(__file__).resolve().parent.parent


def independent_expert_std(x: torch.Tensor, weight: torch.Tensor) -> float:
    """The collapse metric of one layer, restated: right singular vectors by numpy, cosines of every row with
    them, unbiased std per expert, mean over all but the largest std."""
    _, _, vh = np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)
    rows = x.detach().double().reshape(-1, x.shape[-1]).numpy()
    cosines = rows @ vh.T / np.linalg.norm(rows, axis=1, keepdims=True)
    stds = np.sort(cosines.std(axis=0, ddof=1))
    return float(stds[:-1].mean())


def layer_inputs(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of each named layer on the first forward pass of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: seen.setdefault(name, args[0].detach().clone())
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


def test_the_collapse_meter_equals_an_independent_computation_on_plain_and_spectral_models():
    from imse.core.spectral import inject, spectral_layers

    model = tiny_vit(seed=1)
    meter = CollapseMeter(model, blocks=2)
    assert meter.layers == [f"blocks.{b}.{p}" for b in (4, 5) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), meter.measure(model) as values:
        model(x)
        model(torch.zeros(3, 3, 32, 32))  # a second pass (SAM's) is not counted
    inputs = layer_inputs(model, meter.layers, x)
    expected = [independent_expert_std(inputs[n], model.get_submodule(n).weight) for n in meter.layers]
    np.testing.assert_allclose(values, expected, rtol=1e-4)

    spectral = tiny_vit(seed=1)  # the same weights, decomposed, with the first blocks' S changed (as IMSE does)
    inject(spectral)
    with torch.no_grad():
        for name, layer in spectral_layers(spectral).items():
            if name.startswith(("blocks.0", "blocks.1")):
                layer.S.mul_(1.5)
    with torch.no_grad(), meter.measure(spectral) as values:
        spectral(x)
    inputs = layer_inputs(spectral, meter.layers, x)  # different inputs now: the early blocks changed
    expected = [independent_expert_std(inputs[n], model.get_submodule(n).weight) for n in meter.layers]
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    with meter.measure(spectral) as values:
        pass
    assert values == []  # not run: nothing measured


def test_the_meter_reads_imses_own_diversity_statistics_and_gets_the_same_numbers():
    """During an IMSE step the meter takes the last blocks' stds from the method's probe (which computed them for
    L_dm in the same forward) instead of projecting again: the numbers equal a meter that computes its own."""
    from imse.core.methods import create

    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    measured = []
    for reuse in (True, False):
        method = create("imse", tiny_vit(seed=1, head_scale=20.0), lr=1e-3)
        meter = CollapseMeter(method.model, blocks=3)
        calls = []
        for name in meter.layers:  # count the meter's own projections
            meter.bases[name] = CountedBasis(meter.bases[name], calls)
        with meter.measure(method.model, method.probe if reuse else None) as values:
            method(x)
        assert method.last_record["updated"] and len(values) == 12
        measured.append((values, len(calls)))
    (reused, projections), (computed, own) = measured
    assert reused == computed and projections == 0 and own == 12


class CountedBasis(torch.Tensor):
    """A basis that notes each time the meter moves it to the input's device (once per projection it makes)."""

    @staticmethod
    def __new__(cls, basis, calls):
        made = basis.as_subclass(cls)
        made.calls = calls
        return made

    def to(self, *args, **kwargs):
        self.calls.append(1)
        return torch.Tensor.to(self, *args, **kwargs).as_subclass(torch.Tensor)


def test_the_labs_collapse_curves_equal_what_the_records_and_the_model_say():
    config = LabConfig(
        scenario="single",
        corruptions=("contrast",),
        severity=3,
        per_domain=128,
        methods=("IMSE", "TENT", "Source"),
    )
    *_, state = run_lab(config, min_interval=0.0, thumbnails=1)
    records = state.records
    assert len(records) == 2 and state.finished
    for label in config.methods:
        for b, record in enumerate(records):
            layers = record["methods"][label]["expert_std"]
            assert len(layers) == 12  # the last 3 blocks' 4 layers
            assert state.expert_std[label][b] == pytest.approx(sum(layers) / 12, rel=1e-12)
            predictions = record["methods"][label]["predictions"]
            counts = np.bincount(predictions, minlength=10)
            assert state.top_share[label][b] == pytest.approx(counts.max() / len(predictions))
    # Source does not adapt: its first batch's value is the plain backbone's, computed from scratch
    from imse.data.models import create_backbone
    from imse.data.streams import Stream

    backbone = create_backbone(BUILTIN)
    from imse.data.fashion_mnist import BuiltinSource

    stream = Stream(BuiltinSource(), "single", ("contrast",), severity=3, per_domain=128, batch_size=64, seed=0)
    batch = next(iter(stream))
    names = [f"model.blocks.{b}.{p}" for b in (3, 4, 5) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    inputs = layer_inputs(backbone, names, batch.images.float() / 255)
    expected = [independent_expert_std(inputs[n], backbone.get_submodule(n).weight) for n in names]
    np.testing.assert_allclose(records[0]["methods"]["Source"]["expert_std"], expected, rtol=1e-4)
    summary = state.summary["TENT"]
    assert summary["mean_expert_std"] == pytest.approx(np.mean(state.expert_std["TENT"]))


def test_one_place_holds_the_defaults_of_the_lab_the_cli_and_the_readme():
    from imse.__main__ import build_parser
    from imse.app.ui import SETTINGS, settings_values
    from imse.commands import bench_settings

    default = lab_settings()
    from imse.core.methods.base import COMMON_DEFAULTS

    # what a preset never sets: the visitor's machine and precision, and how their own images stream (LabConfig's)
    visitor = {"device": "cpu", "precision": COMMON_DEFAULTS["precision"], "upload_streams": "as-is",
               "upload_labels": "folders"}  # fmt: skip
    assert asdict(LabConfig()) == {**default, **visitor}
    assert dict(zip(SETTINGS, settings_values())) == {
        k: list(v) if isinstance(v, tuple) else v for k, v in default.items() if k in SETTINGS
    }
    cli = bench_settings(build_parser().parse_args(["bench"]))
    for key in ("scenario", "severity", "per_domain", "batch_size", "corruptions", "rounds"):
        assert cli[key] == default[key], key
    assert cli["methods"] == ("source", "tent", "sar", "imse")
    imse = tuned_settings(BUILTIN, "imse")
    assert (default["imse_lr"], default["lambda_dm"]) == (imse["lr"], imse["lambda_dm"])
    # the README's default-run table is the shipped JSON of exactly these settings with all six methods, printed
    # by the CLI's formatter; the earlier four-method CPU run (docs/results.md) has the same settings
    from imse.core.methods import METHODS
    from imse.runs.bench import format_summary

    for name, methods in (("default_run", cli["methods"]), ("six_methods_default_run", tuple(METHODS))):
        result = json.loads(asset_path("results", f"{name}.json").read_text())
        for key in ("scenario", "severity", "per_domain", "batch_size"):
            assert result["config"][key] == default[key], key
        assert tuple(result["config"]["corruptions"]) == default["corruptions"]
        assert result["config"]["seeds"] == [0, 1, 2] and set(result["methods"]) <= set(methods)
        if missing := sorted(set(methods) - set(result["methods"])):  # a method registered after the file was made
            warnings.warn(
                f"assets/results/{name}.json lacks {', '.join(missing)}: rerun its bench to add them", stacklevel=1
            )
    assert format_summary(result) in (ROOT / "README.md").read_text()  # the six methods


def test_tuned_settings_are_what_the_shipped_sweep_chose_and_scale_with_the_batch():
    from imse.core.methods import create
    from imse.data.models import create_backbone
    from imse.runs.runner import build_methods

    sweep = json.loads(asset_path("results", "sweep_builtin.json").read_text())
    assert sweep["protocol"]["corruptions"] == "validation"
    assert set(sweep["methods"]) == {"tent", "sar", "imse", "vida", "dpal"}
    for method in sweep["methods"]:
        chosen = sweep["methods"][method]["chosen"]
        tuned = tuned_settings(BUILTIN, method)
        if method == "vida":  # its rates, and the source warm-up the built-in model ships (docs/protocol.md)
            assert tuned == {**chosen, "checkpoint": str(asset_path("builtin", "vida_warmup.safetensors"))}
        elif method in ("imse", "dpal"):  # rates that do not scale with the batch
            assert tuned == chosen
        else:
            assert tuned["base_lr"] == pytest.approx(chosen["lr"] * 64 / sweep["protocol"]["batch_size"])
    assert tuned_settings(PAPER_BACKBONE, "imse") == {}  # no sweep for it here: the official defaults
    model = create_backbone(BUILTIN)
    built = build_methods(model, BUILTIN, {"t": ("tent", {}), "i": ("imse", {"lr": 1e-4})}, batch_size=32)
    assert built["t"].optimizer.param_groups[0]["lr"] == pytest.approx(tuned_settings(BUILTIN, "tent")["base_lr"] / 2)
    assert built["i"].optimizer.param_groups[0]["lr"] == 1e-4  # an explicit rate wins
    assert create("tent", model).optimizer.param_groups[0]["lr"] == 1e-3  # the library keeps the official default


@pytest.mark.parametrize("name", [name for name in PRESETS if name != "default"])
def test_each_preset_loads_exactly_its_settings(name):
    from imse.app.ui import SETTINGS, load_preset

    preset = PRESETS[name]
    values = load_preset(name)
    loaded = dict(zip(SETTINGS, values[:-1]))
    for key, value in preset.settings.items():
        assert loaded[key] == (list(value) if isinstance(value, tuple) else value), key
    for key in set(SETTINGS) - set(preset.settings):  # everything else is the default run's
        default = lab_settings()[key]
        assert loaded[key] == (list(default) if isinstance(default, tuple) else default), key
    assert preset.watch and preset.watch in values[-1]
    config = LabConfig.from_preset(name)
    assert {f.name: getattr(config, f.name) for f in fields(config) if f.name in preset.settings} == preset.settings
    validate(config)
    assert set(run_methods(asdict(config))) == set(config.methods)


def test_bad_preset_names_are_readable_errors():
    import gradio as gr

    from imse.app.ui import load_preset

    for bad in ("nope", None, 3, ["collapse"]):
        with pytest.raises(gr.Error, match="unknown preset"):
            load_preset(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        lab_settings("nope")


def test_the_default_backbone_follows_the_hub_and_the_gpu():
    assert default_backbone(hub_reachable=True, gpu=True)[0] == PAPER_BACKBONE
    backbone, note = default_backbone(hub_reachable=True, gpu=False)
    assert backbone == BUILTIN and "1 image/s" in note
    backbone, note = default_backbone(hub_reachable=False, gpu=True)
    assert backbone == BUILTIN and note.startswith("Offline")


def test_offline_the_lab_opens_on_the_builtin_within_seconds_with_a_note(monkeypatch):
    from imse.app import ui

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    backbone, note = ui.startup_backbone()
    assert time.perf_counter() - started < 5.0
    assert backbone == BUILTIN and "Offline" in note


def _imagenette_archive(path: Path) -> None:
    """A miniature imagenette2-320.tgz: two classes, three JPEGs each, in the real archive's layout."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for wnid in ("n01440764", "n02102040"):
            for i in range(3):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                info = tarfile.TarInfo(f"imagenette2-320/val/{wnid}/{i}.JPEG")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)


@pytest.fixture
def space_mirrors(tmp_path, monkeypatch) -> Path:
    """What a GPU Space reaches over the network, made local: a Hugging Face cache holding a random-init ViT-B/16
    under the paper backbone's name, and a file:// mirror of the Imagenette archive. Returns the archive."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / f"models--timm--{PAPER_BACKBONE}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_base_patch16_224", pretrained=False).state_dict(), snapshot / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    archive = tmp_path / "mirror" / "imagenette2-320.tgz"
    archive.parent.mkdir()
    _imagenette_archive(archive)
    monkeypatch.setenv("IMSE_IMAGENETTE_URL", archive.as_uri())
    monkeypatch.setenv("IMSE_CACHE", str(tmp_path / "cache"))
    return archive


def test_the_space_path_loads_the_paper_backbone_and_imagenette_from_local_mirrors(space_mirrors, tmp_path):
    """Hub and GPU 'found': the Lab's settings name ViT-B/16 on Imagenette; its weights come from the (local) hub
    cache, the archive downloads once with progress and is cached. No network."""
    from safetensors.torch import load_file

    from imse.data.builders import build_source
    from imse.data.models import create_backbone

    backbone_name, _ = default_backbone(hub_reachable=True, gpu=True)
    config = LabConfig.from_preset("default", backbone=backbone_name)
    assert (config.backbone, config.data) == (PAPER_BACKBONE, "imagenette")
    validate(config)
    backbone = create_backbone(config.backbone)
    saved = load_file(next((tmp_path / "hf").rglob("model.safetensors")))
    assert torch.equal(backbone.model.blocks[0].mlp.fc1.weight, saved["blocks.0.mlp.fc1.weight"])
    downloaded = []
    source = build_source(
        config.data, config.backbone, backbone.input_size, progress=lambda d, t: downloaded.append((d, t))
    )
    assert len(source) == 6 and downloaded[-1][0] == downloaded[-1][1] == space_mirrors.stat().st_size
    assert (tmp_path / "cache" / "imagenette2-320" / "val" / "n01440764").is_dir()
    space_mirrors.unlink()  # cached: the next run needs no mirror
    again = build_source(config.data, config.backbone, backbone.input_size)
    images, labels = source.load([0, 5])
    assert torch.equal(again.load([0, 5])[0], images) and labels.tolist() == [0, 217]  # tench, English springer


@pytest.mark.slow  # ViT-B/16's 48 SVDs on a cold cache: ~40 s on 2 cores
def test_the_space_path_runs_the_lab_end_to_end_from_local_mirrors(space_mirrors, tmp_path):
    backbone, _ = default_backbone(hub_reachable=True, gpu=True)
    config = LabConfig.from_preset("default", backbone=backbone)
    config.corruptions, config.per_domain, config.batch_size, config.methods = ("gaussian_noise",), 6, 3, ("Source",)
    downloaded = []
    *_, state = run_lab(config, min_interval=0.0, thumbnails=1, on_download=lambda d, t, _: downloaded.append((d, t)))
    assert state.finished and state.images == 6 and state.class_names[0].startswith("tench")
    assert downloaded and downloaded[-1][0] == downloaded[-1][1] == space_mirrors.stat().st_size
    space_mirrors.unlink()
    *_, again = run_lab(config, min_interval=0.0, thumbnails=1)
    assert again.finished and math.isclose(
        again.summary["Source"]["mean_accuracy"], state.summary["Source"]["mean_accuracy"]
    )
