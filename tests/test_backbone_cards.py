"""A backbone is one card in ``imse.data.backbones.CARDS``, a corruption one entry in ``imse.data.corruptions.REGISTRY``
(issue 26): a toy of each, registered inside the test alone, is read everywhere with nothing else edited."""

import dataclasses

import pytest
import torch

from imse.core.resources import asset_path
from imse.data.backbones import (
    BUILTIN,
    CARDS,
    IMAGENET_DATA,
    USER_FILE,
    BackboneCard,
    backbone_label,
    hub_backbones,
    lab_backbones,
)
from imse.data.models import BackboneUnavailable, create_backbone


@pytest.fixture
def shipped_toy(monkeypatch):
    """The built-in architecture and weights under another name, with the built-in model's sweep and ViDA file."""
    card = dataclasses.replace(
        CARDS[BUILTIN], name="toy", label="Toy ViT (the built-in one, renamed)", paper_role="toy"
    )
    monkeypatch.setitem(CARDS, "toy", card)
    return card


def test_a_shipped_backbone_card_is_read_by_the_lab_the_builders_reproduce_and_create_backbone(
    shipped_toy, tmp_path, capsys
):
    from imse.__main__ import main
    from imse.data.builders import build_source, source_images
    from imse.data.fashion_mnist import BuiltinSource
    from imse.runs.defaults import lab_settings, tuned_settings
    from imse.runs.reproduce import paper_architectures, plan

    assert lab_backbones()[-1] == "toy" and "toy" not in hub_backbones()
    assert backbone_label("toy") == "Toy ViT (the built-in one, renamed)"
    # the same data, sweep and start files as the built-in model: the same Lab run, full-length domains
    assert lab_settings("default", "toy") == {**lab_settings("default", BUILTIN), "backbone": "toy"}
    assert lab_settings("default", "toy")["data"] == "builtin" and lab_settings("default", "toy")["per_domain"] == 2500
    assert tuned_settings("toy", "imse") == tuned_settings(BUILTIN, "imse") != {}
    assert tuned_settings("toy", "vida")["checkpoint"] == str(asset_path("builtin", "vida_warmup.safetensors"))

    assert isinstance(build_source("builtin", "toy", 32), BuiltinSource)  # its card's data, not refused
    assert torch.equal(source_images("toy", None, count=8), source_images(BUILTIN, None, count=8))

    toy, builtin = create_backbone("toy"), create_backbone(BUILTIN)
    assert (toy.name, toy.input_size, toy.num_classes) == ("toy", 32, 10)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(toy(images), builtin(images))

    assert paper_architectures()["toy"] == "toy"
    assert [job.key for job in plan(["imagenet-c"], ["toy"], ["source"], [0])] == ["toy/imagenet-c/single/source/0"]
    argv = ["reproduce", "--imagenet-c", str(tmp_path), "--backbones", "toy", "--methods", "source", "--dry-run"]
    assert main(argv) == 0
    assert "  toy/imagenet-c/single/source/0  (toy)\n" in capsys.readouterr().out


def test_a_backbone_whose_weights_are_the_users_file_is_asked_for_them_and_built_from_them(monkeypatch, tmp_path):
    import timm
    from safetensors.torch import save_file

    from imse.runs.defaults import lab_settings
    from imse.runs.reproduce import reproduce

    name = "vit_tiny_patch16_224"  # a timm architecture: the weights are named by the file, not a tag
    monkeypatch.setitem(CARDS, name, BackboneCard(name, "ViT-Ti/16 (your file)", IMAGENET_DATA, 224, USER_FILE,
                                                  paper_role="tiny"))  # fmt: skip
    assert name not in lab_backbones() and name not in hub_backbones()  # a public page takes no weights file
    settings = lab_settings("default", name)
    assert (settings["data"], settings["per_domain"]) == ("imagenette", 500)  # an ImageNet backbone: a fifth
    with pytest.raises(BackboneUnavailable, match="has no weights to download"):
        create_backbone(name)
    with pytest.raises(ValueError, match=r"TINY backbone needs your fine-tuned checkpoint: --weights tiny=<file>"):
        reproduce(roots={}, out=tmp_path / "r.json", backbones=("tiny",), progress=False)

    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7)
    save_file(reference.state_dict(), str(tmp_path / "tiny.safetensors"))
    backbone = create_backbone(name, weights=tmp_path / "tiny.safetensors")
    assert (backbone.name, backbone.input_size, backbone.num_classes) == (name, 224, 7)
    assert torch.equal(backbone.model.head.weight, reference.head.weight)


def test_the_papers_mae_backbone_asks_for_the_users_checkpoint():
    assert CARDS["vit_base_patch16_224.mae"].weights == USER_FILE
    with pytest.raises(BackboneUnavailable, match="supply yours with weights=<file>"):
        create_backbone("vit_base_patch16_224.mae")


def test_a_registered_corruption_is_listed_and_corrupts(monkeypatch):
    """The documented steps: a function ``(x, params, draws, table)`` and one ``Corruption`` in the registry, with
    its five severities per table."""
    from imse.data.corruptions import REGISTRY, Corruption, corrupt, corruption_names

    def darken(x, factor, draws, table):
        return x * factor

    halves = (0.9, 0.8, 0.7, 0.6, 0.5)
    monkeypatch.setitem(REGISTRY, "darken", Corruption("darken", darken, {"cifar": halves, "imagenet": halves}))
    # a corruption registered later is an extra: offered (all) but never one of ImageNet-C's 15 nor held out
    assert corruption_names("extra")[-1] == "darken" and corruption_names()[-1] == "darken"
    assert "darken" not in corruption_names("test") + corruption_names("validation")
    images = torch.full((2, 3, 8, 8), 200, dtype=torch.uint8)
    assert torch.equal(corrupt(images, "darken", 5), torch.full_like(images, 100))
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
        corrupt(images, "darken", 6)
    from imse.data.streams import resolve_corruptions
    from imse.runs.lab_config import LabConfig, lab_settings_declared, validate

    assert resolve_corruptions(["darken"]) == ("darken",) and "darken" not in resolve_corruptions("test")
    assert "darken" in lab_settings_declared()["corruptions"].choices()  # the Lab's menu offers it
    assert validate(LabConfig(corruptions=("darken",))).corruptions == ("darken",)
