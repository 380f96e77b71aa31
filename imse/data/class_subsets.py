"""ImageNet-R and ImageNet-A: 200 of ImageNet's 1,000 classes each.

The standard evaluation (Hendrycks et al., and the paper) scores a 1,000-way classifier on them by keeping only
the 200 logits of their classes, in ImageNet order; an image's label is then its class's position among the 200.
The class lists ship as data (``assets/protocols``, origin in its NOTICE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torch import nn

from imse.core.resources import asset_path
from imse.data.sources import Source, imagenet_wnids

__all__ = ["SUBSETS", "RestrictedLogits", "SubsetLabels", "subset_indices"]

SUBSETS = {"imagenet-r": "imagenet_r_200_wnids.txt", "imagenet-a": "imagenet_a_200_wnids.txt"}


@cache
def subset_indices(name: str) -> tuple[int, ...]:
    """The ImageNet-1k indices of a subset's 200 classes, ascending."""
    if name not in SUBSETS:
        raise ValueError(f"unknown class subset {name!r}; choose one of {', '.join(SUBSETS)}")
    wnids = asset_path("protocols", SUBSETS[name]).read_text().split()
    position = {wnid: index for index, wnid in enumerate(imagenet_wnids())}
    unknown = [wnid for wnid in wnids if wnid not in position]
    if unknown or len(set(wnids)) != 200:
        raise ValueError(f"{SUBSETS[name]} must list 200 ImageNet-1k WordNet ids (unknown: {unknown[:3]})")
    return tuple(sorted(position[wnid] for wnid in wnids))


class RestrictedLogits(nn.Module):
    """A 1,000-way backbone that answers with its logits of ``indices`` only (in that order).

    Attributes the runs read (``name``, ``input_size``, ``normalize``) pass through to the wrapped backbone;
    ``class_names`` are the kept classes'."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.as_tensor(list(indices), dtype=torch.int64), persistent=False)
        names = getattr(model, "class_names", None)
        self.class_names = [names[i] for i in self.indices.tolist()] if names else None
        self.name = f"{getattr(model, 'name', type(model).__name__)}[{len(self.indices)} classes]"
        self.input_size = getattr(model, "input_size", 224)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.normalize(x)

    @property
    def num_classes(self) -> int:
        return len(self.indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(-1, self.indices)


class SubsetLabels(Source):
    """A source labelled with ImageNet-1k indices (e.g. ``ImageFolderSource`` on ImageNet-R's wnid folders),
    relabelled as positions among ``indices``; an image of a class outside them is an error, not a silent 0."""

    def __init__(self, source: Source, indices: Sequence[int], name: str | None = None) -> None:
        self.source = source
        self.indices = list(indices)
        self.name = name or source.name
        self.num_classes = len(self.indices)
        self.class_names = [source.class_names[i] for i in self.indices]
        self.size = source.size
        self._position = torch.full((1000,), -1, dtype=torch.int64)
        self._position[torch.as_tensor(self.indices)] = torch.arange(len(self.indices))

    def __len__(self) -> int:
        return len(self.source)

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.source.load(indices)
        mapped = self._position[labels]
        if bool((mapped < 0).any()):
            strangers = sorted(set(labels[mapped < 0].tolist()))[:5]
            raise ValueError(f"{self.name}: images of ImageNet classes {strangers} are outside its {self.num_classes}")
        return images, mapped
