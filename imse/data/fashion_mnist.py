"""Fashion-MNIST, the built-in backbone's data: the raw idx files, and the copies shipped in ``assets/builtin``.

Images are 28×28 grey; the built-in ViT sees them padded to 32×32 and replicated to 3 channels (RGB), which is
also the size the CIFAR-10-C corruption table was made for.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from imse.core.resources import asset_path
from imse.data.sources import Source

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATA_DIR",
    "BuiltinSource",
    "load_idx_split",
    "load_shipped",
    "to_rgb32",
]

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, a cut-off download, a disk error
        raise ValueError(f"cannot read {path}: {error}") from error
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).copy()
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {array.size} values")
    return array.reshape(shape)


def load_idx_split(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the original idx files (gzipped or not)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    paths = []
    for name in _FILES[split]:
        candidates = [root / name, root / name.removesuffix(".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name} not found in {root}; install the Debian package dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist) or pass --data-dir with the four idx files"
            )
        paths.append(found)
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def to_rgb32(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """28×28 grey uint8 → 32×32 RGB uint8 ``[N, 3, 32, 32]`` (zero padding of 2, channel replicated)."""
    x = torch.as_tensor(images)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def load_shipped(name: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The compressed copies in ``assets/builtin``: ``test`` (the full 10k test split) or ``train_sample`` (clean
    training images for the source-domain descriptor). Loaded with ``allow_pickle=False``."""
    with np.load(asset_path("builtin", f"{name}.npz"), allow_pickle=False) as data:
        return data["images"], data["labels"]


class BuiltinSource(Source):
    """Fashion-MNIST as an image source (32×32 RGB uint8, labels 0..9): the shipped ``test`` split (or
    ``train_sample``), or the whole ``train`` split from the original idx files (``load_idx_split``: Debian's
    dataset-fashion-mnist or ``data_dir``), what the built-in model and a ViDA warm-up train on."""

    num_classes = 10
    class_names = CLASS_NAMES
    size = 32

    def __init__(self, split: str = "test", data_dir: str | os.PathLike | None = None) -> None:
        self.name = f"fashion-mnist-{split}"
        images, labels = load_idx_split(split, data_dir) if split == "train" else load_shipped(split)
        self.images = to_rgb32(images)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return self.images[index], self.labels[index]
