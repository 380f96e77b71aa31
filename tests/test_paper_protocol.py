"""The paper protocol's data: RobustBench's ImageNet-C list, the official re-zoom, and the 200-class subsets."""

import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from conftest import assert_equal_to_float32_rounding
from PIL import Image
from torchvision import transforms

from imse.data.class_subsets import RestrictedLogits, SubsetLabels, subset_indices
from imse.data.sources import ImageFolderSource, ImageNetCSource, imagenet_wnids, paper_image_list

WNIDS = ["n01440764", "n01443537"]  # ImageNet-1k classes 0 and 1


def make_imagenet_c(root, files_per_class: int = 3, size: int = 224):
    """root/fog/5/<wnid>/ILSVRC2012_val_000000NN.JPEG: a smooth, different picture per file."""
    rng = np.random.default_rng(0)
    names = []
    for wnid in WNIDS:
        folder = root / "fog" / "5" / wnid
        folder.mkdir(parents=True)
        for k in range(files_per_class):
            y, x = np.mgrid[0:size, 0:size]
            base = rng.uniform(0, 1, 3)
            array = np.stack([(base[c] * 255 + x * (c + 1) + y * (k + 1)) % 256 for c in range(3)], -1)
            name = f"{wnid}/ILSVRC2012_val_{len(names) + 1:08d}.JPEG"
            Image.fromarray(array.astype(np.uint8)).save(root / "fog" / "5" / name, quality=95)
            names.append(name)
    return names


def test_the_shipped_imagenet_c_list_is_robustbenchs_five_thousand():
    listed = paper_image_list()
    assert len(listed) == 5000 and len(set(listed)) == 5000
    assert {name.split("/")[0] for name in listed} <= set(imagenet_wnids())
    assert hashlib.md5("\n".join(listed).encode()).hexdigest() == "8de8bbba2cf05cb54190e49247375985"
    assert listed[:2] == ["n09468604/ILSVRC2012_val_00015253.JPEG", "n02823750/ILSVRC2012_val_00020685.JPEG"]


def test_paper_protocol_keeps_the_listed_images_in_the_lists_order(tmp_path):
    names = make_imagenet_c(tmp_path)
    chosen = [names[4], names[0], names[2]]
    source = ImageNetCSource(tmp_path, "fog", 5, protocol="paper", image_list=chosen)
    assert [path.relative_to(tmp_path / "fog" / "5").as_posix() for path, _ in source.samples] == chosen
    assert source.load([0, 1, 2])[1].tolist() == [1, 0, 0]
    everything = ImageNetCSource(tmp_path, "fog", 5, protocol="paper", images="all")
    lab = ImageNetCSource(tmp_path, "fog", 5)
    assert len(everything) == len(lab) == 6


def test_a_listed_image_missing_is_one_readable_error_naming_it(tmp_path):
    names = make_imagenet_c(tmp_path)
    missing = "n01443537/ILSVRC2012_val_00099999.JPEG"
    with pytest.raises(FileNotFoundError, match="lacks 1 of the 2 images.*ILSVRC2012_val_00099999"):
        ImageNetCSource(tmp_path, "fog", 5, protocol="paper", image_list=[names[0], missing])
    with pytest.raises(ValueError, match="protocol must be one of lab, paper"):
        ImageNetCSource(tmp_path, "fog", 5, protocol="official")


def test_paper_protocol_zooms_again_as_resize_256_centre_crop_224_lab_protocol_does_not(tmp_path):
    names = make_imagenet_c(tmp_path, files_per_class=1)
    path = tmp_path / "fog" / "5" / names[0]
    with Image.open(path) as image:
        raw = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
        official = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])(
            image.convert("RGB")
        )
    paper = ImageNetCSource(tmp_path, "fog", 5, protocol="paper", image_list=[names[0]]).load([0])[0][0]
    lab = ImageNetCSource(tmp_path, "fog", 5).load([0])[0][0]
    assert torch.equal(lab, raw)
    assert (paper.int() - official.int()).abs().max() <= 1  # PIL's bilinear, as torchvision's on PIL images
    assert not torch.equal(paper, raw)


def test_the_200_class_subsets_are_hendrycks_indices():
    """Checked against the indices written out in hendrycks/imagenet-r's and natural-adv-examples' eval.py."""
    r, a = subset_indices("imagenet-r"), subset_indices("imagenet-a")
    assert len(r) == len(a) == 200 and list(r) == sorted(set(r)) and list(a) == sorted(set(a))
    assert r[:12] == (1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29) and r[-3:] == (981, 983, 988)
    assert a[:12] == (6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42) and a[-3:] == (986, 987, 988)
    with pytest.raises(ValueError, match="unknown class subset"):
        subset_indices("imagenet-b")


def test_restricted_logits_and_labels_score_a_thousand_way_model_on_200_classes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 1000)
    indices = subset_indices("imagenet-r")
    restricted = RestrictedLogits(model, indices)
    x = torch.randn(5, 12)
    assert torch.equal(restricted(x), model(x)[:, list(indices)])
    make_imagenet_c(tmp_path)  # classes 0 and 1: 1 is in ImageNet-R, 0 is not
    folder = ImageFolderSource(tmp_path / "fog" / "5", 224)
    relabelled = SubsetLabels(folder, indices)
    assert relabelled.num_classes == 200 and relabelled.load([3])[1].tolist() == [indices.index(1)]
    with pytest.raises(ValueError, match=r"classes \[0\] are outside its 200"):
        relabelled.load([0])


def test_listed_order_takes_the_first_images_and_recurring_rounds_take_disjoint_slices():
    from imse.data.streams import Stream

    class Numbers:  # a source whose label is the image's index
        name, num_classes, class_names, size = "numbers", 10, [str(i) for i in range(10)], 4

        def __len__(self):
            return 10

        def load(self, indices):
            return torch.zeros(len(indices), 3, 4, 4, dtype=torch.uint8), torch.tensor(list(indices))

    def seen(stream):
        return [(b.domain_index, b.labels.tolist()) for b in stream]

    listed = Stream(Numbers(), "continual", ["fog", "snow"], per_domain=4, batch_size=3, order="listed")
    assert [labels for _, labels in seen(listed)] == [[0, 1, 2], [3], [0, 1, 2], [3]]
    recurring = Stream(Numbers(), "recurring", ["fog"], per_domain=3, batch_size=3, rounds=3, order="listed", seed=5)
    rounds = [labels for _, labels in seen(recurring)]
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert rounds == [permutation[0:3], permutation[3:6], permutation[6:9]]
    too_many = Stream(Numbers(), "recurring", ["fog"], per_domain=4, rounds=3, order="listed")
    with pytest.raises(ValueError, match="3 disjoint rounds of 4 images need 12 images per domain"):
        seen(too_many)


def test_bench_on_a_synthetic_imagenet_c_runs_the_paper_protocol_end_to_end(tmp_path, monkeypatch):
    """The built-in model on a tiny ImageNet-C tree: the paper protocol's data rules and method settings reach
    the run, and the lab protocol's do not."""
    import shutil

    from imse.data import sources
    from imse.runs.bench import run_bench

    root = tmp_path / "imagenet-c"
    names = make_imagenet_c(root, files_per_class=4, size=48)
    shutil.copytree(root / "fog", root / "contrast")
    monkeypatch.setattr(sources, "paper_image_list", lambda: names[::-1][:6])
    val = tmp_path / "val"
    shutil.copytree(root / "fog" / "5", val)
    common = dict(backbone="builtin", methods=("sar", "imse"), corruptions=("fog", "contrast"), per_domain=6,
                  batch_size=3, progress=False, collapse=False, imagenet_c=str(root),
                  imagenet_val=str(val))  # fmt: skip
    paper = run_bench(**common)
    assert paper["config"]["protocol"] == "paper"
    settings = paper["config"]["settings"]
    assert settings["imse"]["retrieval"] == "top1" and settings["imse"]["margin_classes"] == 1000
    assert settings["imse"]["source_descriptor"] == "ema" and settings["sar"]["official_recovery"] is True
    assert [d["n"] for d in paper["methods"]["imse"]["domains"]] == [6, 6]
    lab = run_bench(**common, protocol="lab")
    assert lab["config"]["protocol"] == "lab" and lab["config"]["settings"]["imse"]["retrieval"] is None
    assert [d["n"] for d in lab["methods"]["imse"]["domains"]] == [6, 6]
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_bench(**common, protocol="official")


def test_docs_protocol_shows_every_rule_of_the_code():
    from pathlib import Path

    from imse.runs.protocol import RULES, resolve

    page = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for rule in RULES:
        assert f"| {rule.item} | {rule.paper} | {rule.lab} | {rule.official} |" in page
    assert resolve(None, imagenet_data=True) == "paper" and resolve(None, imagenet_data=False) == "lab"


def test_the_paper_protocol_hands_dpal_and_sar_the_official_recovery_and_dpal_the_configured_batch_size():
    """docs/protocol.md, "DPAL, SAR and ViDA beside their official code" and "The paper's other backbones": what
    each protocol sets on them."""
    from conftest import tiny_vit

    from imse.runs.protocol import method_overrides
    from imse.runs.runner import build_methods

    for protocol in ("paper", "lab"):
        specs = {name: (name, method_overrides(protocol, name, "continual")) for name in ("sar", "dpal")}
        built = build_methods(tiny_vit(), "builtin", specs, batch_size=16, tuned=False)
        official = protocol == "paper"
        assert built["sar"].hparams["official_recovery"] is official
        dpal = built["dpal"].hparams
        assert dpal["official_recovery"] is official and dpal["batch_size"] == 16
        assert dpal["similarity_divisor"] == ("configured" if official else "batch")
        assert built["sar"].hparams["official_norms"] is official and dpal["official_forward"] is official


def test_bench_on_imagenet_r_scores_200_classes_with_the_paper_protocol(tmp_path):
    """A 1000-class ViT (random, local weights) on an ImageNet-R-like folder: labels become positions among the
    200 classes, the model answers with those 200 logits, and the paper protocol is the default."""
    import timm
    from safetensors.torch import save_file

    from imse.runs.bench import run_bench

    rng = np.random.default_rng(0)
    for wnid in ("n01443537", "n01484850"):  # ImageNet-1k classes 1 and 2, both in ImageNet-R
        (tmp_path / "r" / wnid).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "r" / wnid / f"{k}.jpg")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(tmp_path / "w.safetensors"))
    result = run_bench(backbone="vit_tiny_patch16_224", weights=str(tmp_path / "w.safetensors"),
                       data=f"imagenet-r:{tmp_path / 'r'}", methods=("source", "imse"), scenario="single",
                       corruptions=("clean",), per_domain=4, batch_size=2, progress=False, collapse=False)  # fmt: skip
    assert result["config"]["protocol"] == "paper"
    assert result["config"]["settings"]["imse"]["margin_classes"] == 1000
    domain = result["methods"]["source"]["domains"][0]
    from imse.data.models import create_backbone

    backbone = create_backbone("vit_tiny_patch16_224", weights=str(tmp_path / "w.safetensors"))
    images, labels = ImageFolderSource(tmp_path / "r", 224).load(range(4))  # ImageNet-1k labels 1, 1, 2, 2
    with torch.no_grad():
        logits = backbone(images.float() / 255)
    r = list(subset_indices("imagenet-r"))
    expected = (logits[:, r].argmax(-1) == torch.tensor([r.index(int(y)) for y in labels])).float().mean()
    assert domain["n"] == 4 and domain["accuracy"] == pytest.approx(float(expected))


def test_reproduce_runs_every_row_resumes_after_an_interruption_and_prints_the_paper_beside_ours(tmp_path, monkeypatch):
    """End to end on a synthetic ImageNet-C tree with a small random ViT standing in for ViT-B/16: every planned
    run lands in the JSON, an interrupted reproduction redoes nothing that finished, and the table shows the
    paper's number for the row it quotes."""
    import json
    import shutil

    import timm
    from safetensors.torch import save_file

    from imse.data import sources
    from imse.runs import bench
    from imse.runs import reproduce as repro

    root = tmp_path / "imagenet-c"
    names = make_imagenet_c(root, files_per_class=2, size=32)
    for corruption in ("gaussian_noise", "shot_noise"):
        shutil.copytree(root / "fog", root / corruption)
    monkeypatch.setattr(sources, "paper_image_list", lambda: names)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    save_file(vit.state_dict(), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "reproduce.json"
    settings = dict(roots={"imagenet-c": str(root)}, out=out, methods=("source", "imse"), seeds=(0,),
                    scenarios=("single", "continual"), corruptions=("gaussian_noise", "shot_noise"),
                    architectures={"supervised": "vit_tiny_patch16_224"}, per_domain=4, batch_size=2,
                    weights={"supervised": str(tmp_path / "tiny.safetensors")}, progress=False,
                    imagenet_val=str(root / "fog" / "5"))  # fmt: skip
    calls, run_bench = [], bench.run_bench  # each run is one run_bench call (reproduce's default job runner)

    def interrupted(**kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((kwargs["scenario"], kwargs["methods"]))
        return run_bench(**kwargs)

    monkeypatch.setattr(bench, "run_bench", interrupted)
    with pytest.raises(KeyboardInterrupt):
        repro.reproduce(**settings)
    saved = json.loads(out.read_text())["runs"].values()
    assert sorted((run["job"]["scenario"], (run["job"]["method"],)) for run in saved) == sorted(calls)
    first, calls[:] = list(calls), []
    monkeypatch.setattr(bench, "run_bench", lambda **kwargs: calls.append((kwargs["scenario"], kwargs["methods"]))
                        or run_bench(**kwargs))  # fmt: skip
    result = repro.reproduce(**settings)
    jobs = repro.plan(["imagenet-c"], ["supervised"], ["source", "imse"], [0], ["single", "continual"])
    assert len(jobs) == 4 and len(first) == len(calls) == 2  # the resumed run does the other two, once each
    assert sorted(first + calls) == sorted((job.scenario, (job.method,)) for job in jobs)
    assert list(result["runs"]) == [job.key for job in jobs]
    run = result["runs"]["supervised/imagenet-c/continual/imse/0"]
    assert run["settings"]["retrieval"] == "top1"
    assert [d["name"] for d in run["domains"]] == ["gaussian_noise", "shot_noise"]
    assert repro.reproduce(**settings, run_job=lambda *a, **k: pytest.fail("a finished run was redone")) == result
    table = repro.format_reproduction(result)
    assert "| supervised | imagenet-c | single |" in table and "| 69.0 |" in table
    single = {
        m: 100 * result["runs"][f"supervised/imagenet-c/single/{m}/0"]["mean_accuracy"] for m in ("source", "imse")
    }
    row = next(line for line in table.splitlines() if "| single |" in line).split("|")
    assert row[4].strip() == f"{single['source']:.1f}" and row[6].strip() == f"{single['imse'] - single['source']:+.1f}"
    with pytest.raises(FileNotFoundError, match="no imagenet-r folder"):
        repro.reproduce(**{**settings, "roots": {"imagenet-r": str(tmp_path / "missing")}})
    with pytest.raises(ValueError, match="MAE backbone needs"):
        repro.reproduce(**{**settings, "backbones": ("mae",)})


@pytest.mark.slow  # starts a Ray cluster
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='needs Ray: pip install "imse-lab[ray]"')
def test_the_ray_engine_gathers_what_the_process_computes(tmp_path):
    """A local Ray on CPU runs each job as a task; the gathered JSON equals the in-process one. Workers see no
    test's monkeypatching, so the tree holds RobustBench's 5,000 listed files (tiny ones) for real."""
    import timm
    from safetensors.torch import save_file

    from imse.runs import reproduce as repro

    folder = tmp_path / "imagenet-c" / "fog" / "5"
    rng = np.random.default_rng(0)
    for name in paper_image_list():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    (tmp_path / "imagenet-c" / "snow").mkdir()
    (tmp_path / "imagenet-c" / "snow" / "5").symlink_to(folder, target_is_directory=True)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    save_file(vit.state_dict(), str(tmp_path / "tiny.safetensors"))
    settings = dict(roots={"imagenet-c": str(tmp_path / "imagenet-c")}, methods=("source", "imse"), seeds=(0,),
                    scenarios=("single", "continual"), corruptions=("fog", "snow"), per_domain=4, batch_size=2,
                    architectures={"supervised": "vit_tiny_patch16_224"}, progress=False,
                    weights={"supervised": str(tmp_path / "tiny.safetensors")})  # fmt: skip
    local = repro.reproduce(**settings, out=tmp_path / "local.json")
    on_ray = repro.reproduce(**settings, out=tmp_path / "ray.json", engine="ray")
    assert list(on_ray["runs"]) == list(local["runs"]) and len(local["runs"]) == 4
    for key, run in local["runs"].items():
        assert on_ray["runs"][key]["mean_accuracy"] == run["mean_accuracy"]
        # counts exactly; confidence and entropy to float32 rounding (a Ray worker computes on its own threads)
        assert_equal_to_float32_rounding(on_ray["runs"][key]["domains"], run["domains"], key)


def test_slot_zeros_images_are_the_official_pick_of_clean_validation_images(tmp_path):
    """random.seed(1), a shuffle of the sorted file list, the first ``count`` — re-zoomed like every ImageNet
    image (Resize 256, CentreCrop 224 at 224 px)."""
    import random

    from imse.runs.protocol import official_source_images

    make_imagenet_c(tmp_path, files_per_class=3, size=40)
    folder = tmp_path / "fog" / "5"
    images = official_source_images(str(folder), 32, count=4)
    order = list(range(6))
    random.Random(1).shuffle(order)
    expected, _ = ImageFolderSource(folder, 32).load(order[:4])
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, expected.float() / 255)


def test_the_reproduction_table_orders_methods_as_the_library_does_whatever_order_they_finished_in():
    from imse.runs import reproduce as repro

    finished = ["dpal", "imse@lr=0.001", "vida", "imse", "source"]  # as a cluster might return them
    runs = {m: {"job": {"backbone": "supervised", "dataset": "imagenet-r", "scenario": "single", "method": m},
                "mean_accuracy": 0.5 + 0.01 * i} for i, m in enumerate(finished)}  # fmt: skip
    header = repro.format_reproduction({"runs": runs}).splitlines()[0]
    assert header.split(" | ")[3:8] == ["source", "imse", "vida", "dpal", "imse@lr=0.001"]


def test_under_the_paper_protocol_vida_is_fed_unnormalised_images_and_refused_without_its_warm_up(tmp_path):
    """docs/protocol.md rows "ViDA start" and "ViDA preprocessing"."""
    from imse.core.methods import METHODS
    from imse.data.models import create_backbone
    from imse.runs.bench import run_bench
    from imse.runs.protocol import method_overrides, missing_under
    from imse.runs.runner import build_methods

    assert method_overrides("paper", "vida", "continual") == {"preprocessing": "unit"}
    assert method_overrides("lab", "vida", "continual") == {}
    backbone = create_backbone("builtin")
    specs = {p: ("vida", method_overrides(p, "vida", "continual")) for p in ("paper", "lab")}
    built = build_methods(backbone, "builtin", specs, batch_size=8, tuned=False)
    assert built["paper"].model.normalise_input is False and built["lab"].model.normalise_input is True
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(built["paper"].model(x), backbone.model(x))  # [0, 1] straight into the ViT
        assert torch.equal(built["lab"].model(x), backbone(x))
    why = METHODS["vida"].paper_requires["checkpoint"]
    expected = [f"vida needs checkpoint under --protocol paper: {why}"]
    assert missing_under("paper", "vida", built["paper"].hparams) == expected
    assert missing_under("lab", "vida", built["lab"].hparams) == []
    common = dict(methods=("vida",), corruptions=("fog",), per_domain=4, batch_size=4, progress=False, collapse=False)
    with pytest.raises(ValueError, match="vida needs checkpoint under --protocol paper"):
        run_bench(protocol="paper", tuned=False, **common)
    with pytest.raises(ValueError, match="trained with preprocessing='backbone'"):  # the built-in warm-up is lab's
        run_bench(protocol="paper", **common)
    lab = run_bench(protocol="lab", **common)  # the built-in model's own warm-up, normalised images
    assert lab["config"]["settings"]["vida"]["checkpoint"].endswith("vida_warmup.safetensors")
