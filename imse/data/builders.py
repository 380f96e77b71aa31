"""Which images a run streams: a data name to a source, and the clean images that describe a bank's slot 0.

Shared by the CLI's runs and the app's Lab (they used to live in ``bench.py``, which the Lab then imported).
"""

from __future__ import annotations

import torch

from imse.core.images import as_float_images
from imse.data.backbones import BUILTIN_DATA, IMAGENET_DATA, backbone_data

__all__ = ["build_source", "class_subset", "for_data", "source_images"]


def build_source(data: str, backbone_name: str, size: int, progress=None):
    """``builtin`` (the shipped Fashion-MNIST test split), ``imagenette`` (downloaded once, cached; ``progress``
    follows the download), ``imagenet-r:<root>`` / ``imagenet-a:<root>`` (their 200 classes, labelled 0–199 as
    ``RestrictedLogits`` answers), or a folder of class folders (ImageNet wnids map to IN-1k labels)."""
    from imse.data.sources import ImageFolderSource, imagenette_source

    subset = class_subset(data)
    if subset:
        name, root = subset
        from imse.data.class_subsets import SubsetLabels, subset_indices

        return SubsetLabels(ImageFolderSource(root, size=size, name=name), subset_indices(name), name=name)

    if data == BUILTIN_DATA:
        if backbone_data(backbone_name) != BUILTIN_DATA:
            raise ValueError(
                "--data builtin is the Fashion-MNIST split of the built-in backbone; use --data "
                "imagenette or an image folder for ImageNet backbones"
            )
        from imse.data.fashion_mnist import BuiltinSource

        return BuiltinSource()
    if data == IMAGENET_DATA:
        return imagenette_source(size=size, progress=progress)
    return ImageFolderSource(data, size=size)


def class_subset(data: str) -> tuple[str, str] | None:
    """``("imagenet-r", root)`` for ``imagenet-r:<root>`` (likewise ImageNet-A), else None."""
    for name in ("imagenet-r", "imagenet-a"):
        if data.startswith(name + ":"):
            return name, data.removeprefix(name + ":")
    return None


def for_data(model, data: str):
    """The backbone as the data needs it: ImageNet-R/A score only their 200 classes' logits."""
    subset = class_subset(data)
    if subset is None:
        return model
    from imse.data.class_subsets import RestrictedLogits, subset_indices

    return RestrictedLogits(model, subset_indices(subset[0]))


def source_images(backbone: str, source, count: int = 2000, seed: int = 0) -> torch.Tensor:
    """Clean source-domain images for the bank's slot 0: the shipped Fashion-MNIST training sample for a backbone
    whose data it is (its card's), else ``count`` clean images of the chosen data (float [0, 1])."""
    if backbone_data(backbone) == BUILTIN_DATA:
        from imse.data.fashion_mnist import load_shipped, to_rgb32

        images, _ = load_shipped("train_sample")
        return as_float_images(to_rgb32(images[:count]))
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:count]
    images, _ = source.load(order.tolist())
    return as_float_images(images)
