"""Built-in backbone, backbones, streams and the bench/sweep CLI, end to end on the CPU, offline."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from imse.__main__ import main
from imse.data.backbones import hub_backbones
from imse.data.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS
from imse.data.fashion_mnist import CLASS_NAMES, BuiltinSource, load_idx_split, load_shipped, to_rgb32
from imse.data.models import BackboneUnavailable, create_backbone
from imse.data.streams import GRADUAL_SEVERITIES, Stream, domain_sequence

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow  # the whole 10,000-image test split
def test_shipped_builtin_checkpoint_is_at_least_90_percent_on_the_full_test_split():
    backbone = create_backbone("builtin")
    source = BuiltinSource()
    assert len(source) == 10_000 and backbone.class_names == CLASS_NAMES and backbone.input_size == 32
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(source), 2000):
            images, labels = source.load(range(start, min(start + 2000, len(source))))
            correct += (backbone(images.float() / 255).argmax(1) == labels).sum().item()
    assert correct / len(source) >= 0.90


def test_shipped_assets_are_small_and_consistent():
    from imse.core.resources import asset_path

    assert asset_path("builtin", "model.safetensors").stat().st_size <= 5 * 2**20
    card = asset_path("builtin", "MODEL_CARD.md").read_text()
    assert "MIT" in card and "train-builtin" in card and "%" in card
    images, labels = load_shipped("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8 and labels.max() == 9
    sample, sample_labels = load_shipped("train_sample")
    assert sample.shape == (2000, 28, 28) and len(sample_labels) == 2000  # the model card's 2,000 training images


def test_backbone_folds_its_normalisation():
    backbone = create_backbone("builtin")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = backbone.model((x - backbone.mean) / backbone.std)
        assert torch.equal(backbone(x), expected)
    assert backbone.mean.flatten().tolist() != [0.5, 0.5, 0.5]  # its own statistics, not a generic default


@pytest.mark.skipif(
    not (Path(FMNIST) / "train-images-idx3-ubyte.gz").exists(),
    reason="needs the Debian package dataset-fashion-mnist",
)
def test_training_runs_a_few_steps_on_a_subset_and_resumes(tmp_path, capsys):
    args = ["train-builtin", "--limit", "256", "--epochs", "1", "--batch-size", "64", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    first = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert first["epoch"] == 1
    assert main([*args[:4], "2", *args[5:]]) == 0  # two epochs: resumes after the first
    assert "resuming" in capsys.readouterr().out
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["epoch"] == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["input_size"] == 32 and config["class_names"] == CLASS_NAMES
    backbone = create_backbone("builtin", weights=tmp_path / "model.safetensors")
    assert backbone(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    images, labels = load_idx_split("test", FMNIST)
    assert images.shape == (10_000, 28, 28) and to_rgb32(images[:2]).shape == (2, 3, 32, 32)


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_split("train", tmp_path)


def test_offline_hub_backbone_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert name in hub_backbones()
    started = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="--weights"):
        create_backbone(name)
    assert time.perf_counter() - started < 5
    with pytest.raises(ValueError, match="tag"):
        create_backbone("vit_base_patch16_224")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet_imaginary_9000")


def test_local_weights_file_loads_without_pickle(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).eval()
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"model": reference.state_dict()}, tmp_path / "w.pth")
    x = torch.rand(1, 3, 224, 224)
    for file in ("w.safetensors", "w.pth"):
        backbone = create_backbone("vit_tiny_patch16_224", weights=tmp_path / file)
        assert backbone.num_classes == 7 and backbone.input_size == 224
        with torch.no_grad():
            assert torch.allclose(backbone(x), reference(backbone.normalize(x)), atol=1e-5)
    torch.save({"model": reference.state_dict(), "evil": object()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneUnavailable, match="safely"):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "evil.pth")
    with pytest.raises(BackboneUnavailable, match="does not exist"):
        create_backbone("vit_tiny_patch16_224", weights=tmp_path / "missing.pth")


def test_an_mae_style_fine_tuned_checkpoint_loads_with_its_pooling_and_normalisation(tmp_path):
    """MAE's fine-tuned ViTs (facebookresearch/mae) classify the mean patch token through ``fc_norm``: such a
    state dict, under timm's MAE tag, loads into an average-pooled ViT with ImageNet's mean/std and gives the
    original model's logits."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool="avg").eval()
    assert "fc_norm.weight" in reference.state_dict()
    save_file(reference.state_dict(), str(tmp_path / "mae.safetensors"))
    backbone = create_backbone("vit_tiny_patch16_224", weights=tmp_path / "mae.safetensors")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone(x), reference(backbone.normalize(x)), atol=1e-5)
    mae = timm.models.get_pretrained_cfg("vit_base_patch16_224.mae")
    assert tuple(mae.mean) == (0.485, 0.456, 0.406)  # what create_backbone folds in for MAE weights


def test_domain_sequences():
    assert [d.corruption for d in domain_sequence("continual")] == list(CORRUPTIONS)
    assert {d.severity for d in domain_sequence("single", severity=3)} == {3}
    gradual = domain_sequence("gradual")
    # the paper's 135 gradual and 2 x 15 recurring domains, read from the registry (an extra corruption joins neither)
    assert len(gradual) == len(CORRUPTIONS) * len(GRADUAL_SEVERITIES) == 135
    assert [d.severity for d in gradual[:9]] == list(GRADUAL_SEVERITIES) and gradual[9].corruption == CORRUPTIONS[1]
    recurring = domain_sequence("recurring", rounds=2)
    assert len(recurring) == 2 * len(CORRUPTIONS) and recurring[len(CORRUPTIONS) :] == recurring[: len(CORRUPTIONS)]
    assert [d.corruption for d in domain_sequence("continual", "validation")] == list(VALIDATION_CORRUPTIONS)
    with pytest.raises(ValueError):
        domain_sequence("shuffled")
    with pytest.raises(ValueError):
        domain_sequence("continual", ["rain"])


def test_stream_yields_domains_in_order_with_counts_and_is_reproducible():
    source = BuiltinSource()
    stream = Stream(source, "gradual", ["fog", "contrast"], per_domain=50, batch_size=16, seed=3)
    batches = list(stream)
    assert len(batches) == len(stream) == 18 * 4
    seen = [(b.domain.corruption, b.domain.severity) for b in batches if b.first_of_domain]
    assert seen == [(c, s) for c in ("fog", "contrast") for s in GRADUAL_SEVERITIES]
    per_domain = {}
    for b in batches:
        per_domain[b.domain_index] = per_domain.get(b.domain_index, 0) + len(b.labels)
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32)
    assert set(per_domain.values()) == {50}
    again = list(Stream(source, "gradual", ["fog", "contrast"], per_domain=50, batch_size=16, seed=3))
    assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(batches, again))
    other = next(iter(Stream(source, "gradual", ["fog", "contrast"], per_domain=50, batch_size=16, seed=4)))
    assert not torch.equal(other.labels, batches[0].labels)
    # each domain shows the same images (comparable accuracies), in its own order
    first = sorted(torch.cat([b.labels for b in batches if b.domain_index == 0]).tolist())
    second = sorted(torch.cat([b.labels for b in batches if b.domain_index == 1]).tolist())
    assert first == second
    with pytest.raises(ValueError, match="only"):
        next(iter(Stream(source, per_domain=20_000)))


def validate_bench_json(result: dict, methods: list[str], domains: list[str], per_domain: int) -> None:
    assert set(result) >= {"config", "versions", "per_seed", "methods", "seconds"}
    assert result["config"]["methods"] == methods and "torch" in result["versions"]
    for name in methods:
        entry = result["methods"][name]
        assert [(d["name"], d["severity"], d["n"]) for d in entry["domains"]] == [(c, 5, per_domain) for c in domains]
        assert entry["images_per_s"] > 0  # measured: no value is known beforehand


def source_accuracy(corruptions: list[str], per_domain: int, batch_size: int, seeds: list[int]) -> list[float]:
    """The unadapted built-in model's accuracy per domain, averaged over the seeds, counted here from the same
    seeded streams bench reads: what bench must report for "source"."""
    backbone, source = create_backbone("builtin"), BuiltinSource()
    correct = {c: 0 for c in corruptions}
    with torch.inference_mode():
        for seed in seeds:
            stream = Stream(source, "continual", corruptions, severity=5, per_domain=per_domain,
                            batch_size=batch_size, seed=seed)  # fmt: skip
            for batch in stream:
                predicted = backbone(batch.images.float() / 255).argmax(1)
                correct[corruptions[batch.domain_index]] += int((predicted == batch.labels).sum())
    return [correct[c] / (per_domain * len(seeds)) for c in corruptions]


def test_bench_cli_runs_a_tiny_continual_stream_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        [
            "bench",
            "--methods", "source,tent,sar,imse",
            "--per-domain", "32",
            "--batch-size", "16",
            "--seeds", "0,1",
            "--corruptions", "validation",
            "--severity", "5",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "| imse |" in printed and "± " in printed
    result = json.loads(out.read_text())
    validate_bench_json(result, ["source", "tent", "sar", "imse"], list(VALIDATION_CORRUPTIONS), per_domain=32)
    expected = source_accuracy(list(VALIDATION_CORRUPTIONS), per_domain=32, batch_size=16, seeds=[0, 1])
    assert [d["accuracy"] for d in result["methods"]["source"]["domains"]] == expected  # k / 64: exact in binary
    assert result["methods"]["source"]["mean_accuracy"] == sum(expected) / 4
    trainable = {m: result["methods"][m]["num_trainable"] for m in result["methods"]}
    # the built-in ViT: width 128, 6 blocks; IMSE: S of blocks 0-2 (4 layers of rank 128 each); SAR: the two
    # LayerNorms (weight and bias) of blocks 0-2; TENT: every LayerNorm, 2 per block and the final one
    assert trainable == {"source": 0, "tent": 13 * 2 * 128, "sar": 3 * 2 * 2 * 128, "imse": 3 * 4 * 128}
    # the same seed gives the same numbers (paired, reproducible)
    assert main(["bench", "--methods", "source", "--per-domain", "32", "--batch-size", "16", "--severity", "5",
                 "--corruptions", "validation", "--out", str(tmp_path / "again.json")]) == 0  # fmt: skip
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["per_seed"][0]["methods"]["source"]["domains"] == result["per_seed"][0]["methods"]["source"]["domains"]


@pytest.mark.slow  # 24 runs of the sweep's protocol end to end (15 s): the CI runs it with the slow set
def test_sweep_tries_the_same_lr_grid_for_every_method_then_checks_the_margin_and_lambda(tmp_path):
    from imse.runs.sweep import LR_FACTORS

    out = tmp_path / "sweep.json"
    assert main(["sweep", "--methods", "tent,imse", "--per-domain", "8", "--batch-size", "8",
                 "--severities", "2,5", "--out", str(out)]) == 0  # fmt: skip
    sweep = json.loads(out.read_text())
    assert sweep["protocol"]["corruptions"] == "validation" and sweep["protocol"]["severities"] == [2, 5]
    for method in ("tent", "imse"):
        entry = sweep["methods"][method]
        assert len(entry["grid"]) == len(LR_FACTORS) and str(entry["lr"]) in entry["grid"]
        assert entry["grid"][str(entry["lr"])] == max(entry["grid"].values())
        for stage in entry["stages"]:  # each candidate's score is the mean over the severities' streams
            for value, score in stage["grid"].items():
                assert score == pytest.approx(sum(stage["per_severity"][value].values()) / 2)
            assert stage["source"] == entry["stages"][0]["source"]  # every stage saw the same images
        assert entry["runs"] == sum(len(stage["grid"]) for stage in entry["stages"])
    imse = sweep["methods"]["imse"]
    assert [stage["setting"] for stage in imse["stages"]] == ["lr", "lambda_dm", "margin_classes"]
    assert set(imse["chosen"]) == {"lr", "lambda_dm", "margin_classes"} and imse["stages"][1]["grid"].keys() == {
        "0.0",
        "10.0",
        "50.0",
        "200.0",
    }
    assert main(["bench", "--methods", "imse", "--per-domain", "16", "--batch-size", "16", "--corruptions",
                 "validation", "--hparams", str(out), "--out", str(tmp_path / "b.json")]) == 0  # fmt: skip
    used = json.loads((tmp_path / "b.json").read_text())["config"]["lr"]["imse"]
    assert used == sweep["methods"]["imse"]["lr"]


def test_bench_on_pregenerated_imagenet_c_folder_with_local_weights(tmp_path):
    """ImageNet-C layout root/<corruption>/<severity>/<wnid>/*.JPEG through the CLI, a local weights file."""
    from safetensors.torch import save_file

    from imse.data.sources import imagenet_wnids

    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(tmp_path / "w.safetensors"))
    rng = np.random.RandomState(0)
    for corruption in ("speckle_noise", "gaussian_blur", "spatter", "saturate"):
        for wnid in imagenet_wnids()[:2]:
            folder = tmp_path / "inc" / corruption / "5" / wnid
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.randint(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    out = tmp_path / "r.json"
    command = ["bench", "--backbone", "vit_tiny_patch16_224", "--weights", str(tmp_path / "w.safetensors"),
               "--data", f"imagenet-c:{tmp_path / 'inc'}", "--methods", "source", "--corruptions", "validation",
               "--severity", "5", "--per-domain", "6", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    assert main(command) == 2  # the paper protocol (the default on ImageNet-C) needs RobustBench's 5,000 images
    assert main([*command, "--protocol", "lab"]) == 0  # every image of the folder
    result = json.loads(out.read_text())
    validate_bench_json(result, ["source"], list(VALIDATION_CORRUPTIONS), per_domain=6)
    assert result["methods"]["source"]["num_trainable"] == 0


def test_bench_reports_bad_input_without_a_traceback(capsys):
    assert main(["bench", "--methods", "source,cotta", "--per-domain", "8"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--data", "/nonexistent/folder", "--backbone", "builtin", "--per-domain", "8"]) == 2


def test_method_specs_carry_overrides():
    from imse.runs.bench import parse_method

    assert parse_method("imse") == ("imse", {})
    assert parse_method("imse@retrieval=top1:lr=0.003:shift_threshold=2e-2") == (
        "imse",
        {"retrieval": "top1", "lr": 0.003, "shift_threshold": 0.02},
    )
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("cotta@lr=1")


def test_one_learning_rate_sets_every_rate_of_a_method_at_the_official_ratio():
    from imse.core.methods import METHODS, adaptive_methods
    from imse.runs.bench import run_bench
    from imse.runs.defaults import method_rates
    from imse.runs.sweep import sweep_checks

    assert method_rates("vida", 1e-6) == {"lr": 1e-6, "adapter_lr": pytest.approx(1e-6 * 2e-7 / 5e-7)}
    assert method_rates("dpal", 3e-3) == {"lr": 3e-3, "predictor_lr": 3e-3}
    assert method_rates("imse", 1e-4) == {"lr": 1e-4}
    assert set(adaptive_methods()) == set(METHODS) - {"source"} == set(sweep_checks())  # the sweep tunes them all
    # a rate given to bench (as --lr or a sweep file's) reaches the coupled one
    result = run_bench(methods=("vida",), lrs={"vida": 1e-6}, per_domain=8, batch_size=8,
                       corruptions=("fog",), progress=False)  # fmt: skip
    settings = result["config"]["settings"]["vida"]
    assert settings["lr"] == 1e-6 and settings["adapter_lr"] == pytest.approx(4e-7)


def test_a_later_sweep_adds_its_methods_only_under_the_same_protocol():
    from imse.runs.sweep import merge_sweeps

    protocol = {"scenario": "continual", "per_domain": 2000, "severities": [3, 5], "checks": {"tent": []}}
    earlier = {"protocol": protocol, "versions": {"torch": "a"}, "methods": {"tent": {"lr": 1e-3}}}
    later = {
        "protocol": {**protocol, "device": "cuda", "checks": {"vida": []}},
        "versions": {"torch": "b"},
        "methods": {"vida": {"lr": 5e-7}},
    }
    merged = merge_sweeps(earlier, later)
    assert merged["methods"]["tent"] == {"run": {"device": "not recorded", "versions": {"torch": "a"}}, "lr": 1e-3}
    assert merged["methods"]["vida"] == {"run": {"device": "cuda", "versions": {"torch": "b"}}, "lr": 5e-7}
    assert merged["protocol"]["checks"] == {"tent": [], "vida": []} and "device" not in merged["protocol"]
    with pytest.raises(ValueError, match="per_domain"):
        merge_sweeps(earlier, {**later, "protocol": {**later["protocol"], "per_domain": 500}})


def test_sweep_update_refuses_another_protocol_before_running_anything(tmp_path, capsys):
    from imse.core.resources import asset_path

    shipped = asset_path("results", "sweep_builtin.json")  # 2,000 images per domain, not 8
    out = tmp_path / "sweep.json"
    started = time.perf_counter()
    assert main(["sweep", "--methods", "tent", "--per-domain", "8", "--update", str(shipped), "--out", str(out)]) == 2
    assert "protocols differ in per_domain" in capsys.readouterr().err and not out.exists()
    assert time.perf_counter() - started < 5  # refused up front: no run of the grid
    (tmp_path / "other.json").write_text('{"runs": {}}')
    assert main(["sweep", "--methods", "tent", "--update", str(tmp_path / "other.json"), "--out", str(out)]) == 2
    assert "is not a sweep's JSON" in capsys.readouterr().err and not out.exists()
