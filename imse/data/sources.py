"""Clean image sources: folders of images on disk, pre-generated ImageNet-C, and the Imagenette validation set.

A source yields uint8 ``[n, 3, size, size]`` images and int64 labels; corruption happens later, batched on the
device (``imse.data.corruptions``), so every source stays a plain, deterministic file reader. Images follow the
ImageNet evaluation protocol (shorter side to ``round(size · 256 / 224)``, bilinear with antialiasing, then a
centre crop), which is what timm's eval transform and the ImageNet-C generator apply: the models' accuracy and
the corruption parameters were calibrated on images prepared this way.

Labels are ImageNet-1k indices whenever the class folders are WordNet ids (Imagenette, ImageNet-C, ImageNet
val laid out as an ImageFolder), so an ImageNet classifier's logits can be scored without a mapping table.
Nothing here unpickles anything, and nothing touches the network except ``imagenette_source`` when its cache
is empty.
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from imse.core.resources import asset_path, default_cache_dir, offline

__all__ = [
    "IMAGENETTE_URL",
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "ImageFolderSource",
    "ImageNetCSource",
    "Source",
    "imagenet_class_names",
    "imagenet_wnids",
    "imagenette_source",
    "imagenette_url",
    "paper_image_list",
    "prepare_image",
]

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_IMAGENETTE_FOLDER = "imagenette2-320"
_DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
DownloadProgress = Callable[[int, "int | None"], None]  # (bytes so far, total bytes or None)


# --- ImageNet-1k class list (offline, from timm's bundled metadata) -------------------------------------------


@functools.lru_cache(maxsize=1)
def _imagenet_info() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    wnids = tuple(info.label_names())
    names = tuple(info.label_descriptions())
    if len(wnids) != 1000 or wnids[0] != "n01440764" or len(names) != 1000:
        raise RuntimeError("timm's ImageNet-1k metadata is not the expected 1000-class list in index order")
    return wnids, names


@functools.lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(_imagenet_info()[0])}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (``n01440764`` is class 0), read from timm's
    bundled metadata so that no download is needed."""
    return list(_imagenet_info()[0])


def imagenet_class_names() -> list[str]:
    """Human-readable ImageNet-1k class names in class-index order (``"tench, Tinca tinca"``, ...)."""
    return list(_imagenet_info()[1])


# --- Image preparation ----------------------------------------------------------------------------------------


def _resize_shorter(image: Image.Image, short: int) -> Image.Image:
    """Resize so that the shorter side is ``short``, with torchvision's rounding (the longer side is truncated),
    so that results equal ``torchvision.transforms.Resize(short)`` on a PIL image. PIL's bilinear filter widens
    its support when shrinking, i.e. it antialiases."""
    width, height = image.size
    if width <= height:
        new_width, new_height = short, int(short * height / width)
    else:
        new_width, new_height = int(short * width / height), short
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop with torchvision's offsets (``round((side - size) / 2)``); the image is at least ``size``."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    if (left, top, width, height) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def prepare_image(image: Image.Image, size: int, scale: bool = True) -> torch.Tensor:
    """One PIL image as a uint8 ``[3, size, size]`` tensor. With ``scale`` (the ImageNet eval protocol) the
    shorter side goes to ``round(size · 256 / 224)`` before the centre crop; without it (images that were
    prepared that way already, like ImageNet-C's) an image of the right size is left untouched and any other is
    resized to ``size`` on its shorter side and centre-cropped."""
    image = image.convert("RGB")
    if scale:
        image = _resize_shorter(image, round(size * 256 / 224))
    elif image.size != (size, size):
        image = _resize_shorter(image, size)
    image = _center_crop(image, size)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_image(path: Path, size: int, scale: bool) -> torch.Tensor:
    """Decode one file; a file PIL cannot read becomes a ``ValueError`` that names it, so that one bad file in
    thousands is easy to find."""
    try:
        with Image.open(path) as image:
            return prepare_image(image, size, scale)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


# --- Sources --------------------------------------------------------------------------------------------------


class Source:
    """What the stream needs from a dataset: labelled clean images by index, at a fixed square size.

    ``load`` returns uint8 images ``[n, 3, size, size]`` and int64 labels ``[n]`` in the order of ``indices``;
    the same indices always give the same tensors. ``labelled`` is False for a user's images without classes (their
    labels are all -1)."""

    labelled = True
    name: str
    num_classes: int
    class_names: list[str]
    size: int

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, images={len(self)}, "
            f"classes={self.num_classes}, size={self.size})"
        )


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return size


def _visible(path: Path) -> bool:
    """Hidden entries (``.DS_Store``, macOS ``._x.jpg`` resource forks, ``.ipynb_checkpoints``) are never data."""
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (nested folders included, as torchvision's ImageFolder does), sorted by their
    path relative to it so that the order is the same on every file system."""
    files = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and all(_visible(Path(part)) for part in path.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


class ImageFolderSource(Source):
    """Images laid out as ``root/<class>/<image>`` (jpg, jpeg, png, bmp, webp; any case).

    When every class folder is an ImageNet-1k WordNet id the labels are ImageNet-1k indices (``num_classes`` 1000)
    so that an ImageNet classifier scores them directly, even for a subset such as Imagenette's 10 classes.
    Otherwise the labels are the folders' positions in sorted order and ``class_names`` are the folder names."""

    def __init__(self, root: str | os.PathLike, size: int = 224, *, name: str | None = None):
        self.root = Path(root).expanduser()
        self.size = _check_size(size)
        self.name = name or self.root.name or str(self.root)
        self._scale = True
        if not self.root.exists():
            raise FileNotFoundError(f"no image folder {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder (expected {self.root}/<class>/<images>)")
        self.classes = sorted(path.name for path in self.root.iterdir() if path.is_dir() and _visible(path))
        if not self.classes:
            raise ValueError(f"no class folders in {self.root} (expected {self.root}/<class>/<images>)")
        index = _wnid_index()
        self.uses_imagenet_labels = all(folder in index for folder in self.classes)
        if self.uses_imagenet_labels:
            self.num_classes = 1000
            self.class_names = imagenet_class_names()
            label_of = index
        else:
            self.num_classes = len(self.classes)
            self.class_names = list(self.classes)
            label_of = {folder: position for position, folder in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = [
            (path, label_of[folder]) for folder in self.classes for path in _image_files(self.root / folder)
        ]
        if not self.samples:
            raise ValueError(f"no images in {self.root}: its class folders hold no {', '.join(IMAGE_EXTENSIONS)} files")
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        positions = [int(i) for i in indices]
        for i in positions:
            if not 0 <= i < len(self.samples):
                raise IndexError(f"index {i} out of range for {self.name} ({len(self.samples)} images)")
        images = torch.empty((len(positions), 3, self.size, self.size), dtype=torch.uint8)
        for row, i in enumerate(positions):
            images[row] = _read_image(self.samples[i][0], self.size, self._scale)
        labels = self.labels[torch.tensor(positions, dtype=torch.int64)]
        return images, labels


PROTOCOLS = ("lab", "paper")


def paper_image_list() -> list[str]:
    """RobustBench's 5,000 ImageNet-C images (``wnid/file``, in order), shipped in assets/protocols."""
    return asset_path("protocols", "imagenet_c_5000.txt").read_text().split()


class ImageNetCSource(ImageFolderSource):
    """Pre-generated ImageNet-C, ``root/<corruption>/<severity>/<wnid>/*.JPEG``, labelled with ImageNet-1k
    indices.

    ``protocol="lab"``: every image of the folder; they were resized and cropped to 224 px before being corrupted,
    so they are only resized (shorter side to ``size``, centre crop) when ``size`` differs — cropping them again
    would zoom in twice. ``protocol="paper"``: as the official code (its ``robustbench/data.py``
    ``load_imagenetc``): the 5,000 images of RobustBench's list in the list's order (``images="all"``: every
    image, for the recurring protocol's disjoint splits), each resized to 256 and centre-cropped to 224 again.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        corruption: str,
        severity: int,
        size: int = 224,
        *,
        protocol: str = "lab",
        images: str = "list",
        image_list: Sequence[str] | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if images not in ("list", "all"):
            raise ValueError(f"images must be 'list' or 'all', got {images!r}")
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
        if not corruption or "/" in corruption or "\\" in corruption or corruption in (".", ".."):
            raise ValueError(f"corruption must be a folder name such as 'fog', got {corruption!r}")
        base = Path(root).expanduser()
        if not base.is_dir():
            raise FileNotFoundError(f"no ImageNet-C root folder {base}")
        folder = base / corruption / str(severity)
        if not folder.is_dir():
            present = sorted(path.name for path in base.iterdir() if path.is_dir() and _visible(path))
            raise FileNotFoundError(
                f"no ImageNet-C folder {folder} (expected {base}/<corruption>/<severity>/<wnid>/*.JPEG; "
                f"corruptions present: {', '.join(present) or 'none'})"
            )
        super().__init__(folder, size, name=f"imagenet-c/{corruption}/{severity}")
        if not self.uses_imagenet_labels:
            strangers = [folder for folder in self.classes if folder not in _wnid_index()]
            raise ValueError(
                f"{folder} is not an ImageNet-C folder: {', '.join(strangers[:5])} "
                "are not ImageNet-1k WordNet ids (expected <wnid>/*.JPEG)"
            )
        self.corruption = corruption
        self.severity = severity
        self.protocol = protocol
        self._scale = protocol == "paper"  # the official Resize(256) + CenterCrop(224) on the 224 px files
        if protocol == "paper" and images == "list":
            self._keep_listed(folder, image_list)

    def _keep_listed(self, folder: Path, image_list: Sequence[str] | None) -> None:
        """Only the listed images (``wnid/file`` relative to the severity folder), in the list's order."""
        listed = list(image_list) if image_list is not None else paper_image_list()
        by_name = {path.relative_to(folder).as_posix(): (path, label) for path, label in self.samples}
        missing = [name for name in listed if name not in by_name]
        if missing:
            raise FileNotFoundError(
                f"{folder} lacks {len(missing)} of the {len(listed):,} images the paper protocol evaluates (e.g. "
                f"{folder / missing[0]}); it needs the full ImageNet-C severity folder (50,000 images)"
            )
        self.samples = [by_name[name] for name in listed]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)


# --- Imagenette -----------------------------------------------------------------------------------------------


def _unavailable(reason: str, url: str, cache: Path) -> RuntimeError:
    """The error that tells a user without network access exactly how to supply the data by hand."""
    target = cache / _IMAGENETTE_FOLDER / "val"
    return RuntimeError(
        f"Imagenette could not be downloaded from {url}: {reason}. To use it offline, download "
        f"{_IMAGENETTE_FOLDER}.tgz elsewhere and extract it into {cache} (tar -xzf {_IMAGENETTE_FOLDER}.tgz -C "
        f"{cache}) so that {target}/<wnid>/*.JPEG exists, or set IMSE_CACHE to a folder that holds "
        f"{_IMAGENETTE_FOLDER}/val. Alternatively --data <folder> takes any ImageFolder (<folder>/<class>/<images>)."
    )


def _download(url: str, destination: Path, progress: DownloadProgress | None = None) -> None:
    """Stream ``url`` into ``destination`` with a progress bar (shown on terminals only) and ``progress(done,
    total)`` calls (the app's bar); a short read is an error, so a truncated archive is never extracted."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a convenience, not a dependency
        tqdm = None
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, open(destination, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=_IMAGENETTE_FOLDER, disable=None) if tqdm else None
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                if progress is not None:
                    progress(received, total)
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise OSError(f"incomplete download: {received} of {total} bytes")


def _check_member(member: tarfile.TarInfo) -> None:
    """Only plain files and folders with relative paths inside the archive's own tree may be extracted."""
    path = PurePosixPath(member.name)
    parts = path.parts or ("",)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or ".." in parts or ":" in parts[0]:
        raise ValueError(f"unsafe path {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"{member.name!r} is a link or special file")


def _extract(archive: Path, destination: Path) -> None:
    """Extract in one streaming pass, refusing the whole archive at its first unsafe member (the caller then
    deletes the partial extraction). ``filter="data"`` adds the standard library's own checks where present."""
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            _check_member(member)
            tar.extract(member, destination, **extra)


def imagenette_url() -> str:
    """``$IMSE_IMAGENETTE_URL`` (a host's mirror, or a ``file://`` copy of the archive), else the fast.ai URL."""
    return os.environ.get("IMSE_IMAGENETTE_URL", "").strip() or IMAGENETTE_URL


def imagenette_source(
    size: int = 224,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    progress: DownloadProgress | None = None,
) -> ImageFolderSource:
    """The Imagenette validation set (3,925 images of 10 ImageNet classes, labelled with ImageNet-1k indices):
    real photos an ImageNet model knows, small enough to download on first use (~330 MB).

    Uses ``<cache>/imagenette2-320/val`` when present (``cache_dir``, else ``$IMSE_CACHE`` or ``~/.cache/imse``).
    Otherwise downloads ``url`` into a temporary file in the cache, extracts it into a temporary folder and moves
    the result into place with one rename, so an interrupted or refused download never leaves a half-filled
    cache. Raises ``RuntimeError`` with instructions for placing the data by hand when ``HF_HUB_OFFLINE`` or
    ``IMSE_OFFLINE`` is set (a ``file://`` URL is read even then: it is no download), the download fails (30 s
    timeout), or the archive is unreadable or unsafe. ``progress(done, total)`` follows the download."""
    _check_size(size)
    url = url or imagenette_url()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / _IMAGENETTE_FOLDER
    val = target / "val"
    if val.is_dir():
        return ImageFolderSource(val, size, name="imagenette")
    if target.exists():
        raise _unavailable(f"{target} exists but has no val folder; remove it or complete it", url, cache)
    if offline() and not url.startswith("file:"):
        raise _unavailable("offline mode is on (HF_HUB_OFFLINE or IMSE_OFFLINE is set)", url, cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unavailable(f"cannot create the cache folder ({error})", url, cache) from error
    handle, archive_name = tempfile.mkstemp(prefix=f".{_IMAGENETTE_FOLDER}-", suffix=".part", dir=cache)
    os.close(handle)
    archive = Path(archive_name)
    staging = Path(tempfile.mkdtemp(prefix=f".{_IMAGENETTE_FOLDER}-", dir=cache))
    try:
        try:
            _download(url, archive, progress)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
            raise _unavailable(f"{type(error).__name__}: {error}", url, cache) from error
        try:
            _extract(archive, staging)
        except (tarfile.TarError, OSError, ValueError) as error:
            raise _unavailable(f"refusing the archive ({type(error).__name__}: {error})", url, cache) from error
        if not (staging / _IMAGENETTE_FOLDER / "val").is_dir():
            raise _unavailable(f"the archive has no {_IMAGENETTE_FOLDER}/val folder", url, cache)
        try:
            os.replace(staging / _IMAGENETTE_FOLDER, target)
        except OSError as error:
            if not val.is_dir():  # not another process that finished first
                raise _unavailable(f"cannot move the data into {target} ({error})", url, cache) from error
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return ImageFolderSource(val, size, name="imagenette")
