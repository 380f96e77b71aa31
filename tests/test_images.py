"""One rule for image batches: float in [0, 1], or uint8 in [0, 255] converted by x / 255; nothing else."""

import copy

import pytest
import torch
from conftest import tiny_vit

from imse.core.methods import create
from imse.data.models import BUILTIN, create_backbone


def uint8_batch(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_a_backbone_reads_uint8_images_as_x_over_255():
    backbone = create_backbone(BUILTIN)
    images = uint8_batch()
    with torch.no_grad():
        from_uint8 = backbone(images)
        from_float = backbone(images.float() / 255)
    assert torch.isfinite(from_uint8).all()  # it used to be NaN: the mean and std were cast to uint8
    assert torch.equal(from_uint8, from_float)


@pytest.mark.parametrize("name", ["source", "tent", "sar", "imse"])
def test_a_method_adapts_the_same_on_uint8_and_on_float_images(name):
    images = uint8_batch()
    one = create(name, tiny_vit(head_scale=8.0))
    other = copy.deepcopy(one)
    assert torch.equal(one(images), other(images.float() / 255))
    for (key, a), b in zip(one.model.state_dict().items(), other.model.state_dict().values()):
        assert torch.equal(a, b), key  # the same update


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.int8])
def test_other_dtypes_are_refused_with_the_expected_dtype_and_range(dtype):
    images = uint8_batch().to(dtype)
    with pytest.raises(TypeError, match=r"float in \[0, 1\] or uint8 in \[0, 255\]"):
        create_backbone(BUILTIN)(images)
    with pytest.raises(TypeError, match=r"float in \[0, 1\] or uint8 in \[0, 255\]"):
        create("imse", tiny_vit())(images)
