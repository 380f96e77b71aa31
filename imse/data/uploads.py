"""A user's own images, prepared once as the model will see them: a source the streams read like any other.

``prepare_upload`` checks the upload (``upload_files``), finds its layout and classes (``upload_layout``), reads
each image with its bytes counted, checks its header's pixel count before decoding, decodes and prepares it at the
model's input size, and writes the result into a folder of its own (``folder``: the visitor's session folder, or
the CLI's cache) as raw uint8 arrays and a manifest. Unreadable images are skipped and counted. The folder is
named by the upload's fingerprint and how it was prepared, so the same upload for the same model is never
decoded twice. Nothing is written anywhere else, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imse.data.sources import Source, prepare_image
from imse.data.upload_files import UploadLimits, UploadRefused, list_upload, read_limited, starts_like_an_archive
from imse.data.upload_layout import ClassMatch, Layout, detect_layout

__all__ = [
    "AS_IS",
    "CORRUPTED",
    "UNLABELLED",
    "UPLOAD_STREAMS",
    "ModelView",
    "PreparedUpload",
    "UploadSource",
    "load_prepared",
    "prepare_upload",
]

# what streams of an upload: its images as they are (its domains are the shifts), or through the chosen corruptions
# (each corruption a domain over all of them)
AS_IS, CORRUPTED = "as-is", "corrupted"
UPLOAD_STREAMS = (AS_IS, CORRUPTED)
UNLABELLED = -1  # the label of an image without one: never a class, so no prediction is ever counted right
_FORMAT = 1  # the prepared folder's layout version
_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO"}  # MPO: a phone's JPEG with a second frame
Progress = Callable[[int, int], None]  # (images prepared, images in all)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


@dataclass(frozen=True)
class ModelView:
    """How a model sees an image: its input side, whether images no larger than that are centred on black rather
    than resized (the built-in model saw 28-px Fashion-MNIST padded to 32), and its classes' names."""

    input_size: int
    pad_small: bool
    classes: ClassMatch
    classes_id: str  # names the class list (part of the prepared folder's name)


def _prepared(image: Image.Image, view: ModelView) -> torch.Tensor:
    side = view.input_size
    if view.pad_small and image.width <= side and image.height <= side:
        canvas = Image.new("RGB", (side, side))
        canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
        return torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1)
    return prepare_image(image, view.input_size)


def _too_many_pixels(name: str, pixels: int | None, limit: float) -> str:
    claimed = f"{pixels:,} pixels" if pixels else "more pixels than PIL opens"
    return f"{name} claims {claimed}; the limit is {limit:,.0f} per image: refused before decoding"


def _decode(name: str, data: bytes, view: ModelView, max_pixels: float) -> torch.Tensor | str:
    """One image as the model sees it, or why it was skipped. A header claiming more pixels than allowed refuses
    the whole upload, before any decoding (a decompression bomb is an attack, not a broken file)."""
    if starts_like_an_archive(data):
        raise UploadRefused(f"{name} is an archive, not an image: nested archives are refused")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise UploadRefused(_too_many_pixels(name, image.width * image.height, max_pixels))
            if image.format not in _FORMATS:
                return f"{image.format} is not accepted"
            if image.format == "JPEG":
                image.draft("RGB", (view.input_size * 2, view.input_size * 2))  # DCT scaling: decode a big photo small
            image.load()
            return _prepared(image, view)
    except UploadRefused:
        raise
    except Image.DecompressionBombError as error:  # PIL's own bound (above ours) refused the header at open
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        raise UploadRefused(_too_many_pixels(name, int(claimed.group(1)) if claimed else None, max_pixels)) from None
    except UnidentifiedImageError:  # an image's signature without the rest is a cut-off file, not a stranger
        return "truncated" if data.startswith(_IMAGE_MAGIC) else "not an image"
    except (OSError, SyntaxError, ValueError) as error:
        return "truncated" if "truncat" in str(error).lower() else "not a readable image"


class UploadSource(Source):
    """Prepared images (all, or one domain's) as a ``Source``: uint8 ``[n, 3, size, size]`` and int64 labels
    (``UNLABELLED`` for an upload without classes)."""

    def __init__(self, upload: PreparedUpload, positions: np.ndarray, name: str) -> None:
        self.upload, self.positions, self.name = upload, positions, name
        self.size = upload.size
        self.labelled = upload.labelled
        self.class_names = list(upload.view_labels)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.positions)

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.positions[np.asarray(list(indices), dtype=np.int64)]
        images = torch.from_numpy(np.ascontiguousarray(self.upload.images[rows]))
        return images, torch.from_numpy(self.upload.labels[rows].copy())


class PreparedUpload:
    """A prepared folder: its manifest, its images (memory-mapped, so a large upload is not held in memory) and the
    sources the streams read."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        count, size = self.manifest["count"], self.manifest["size"]
        self.size = size
        self.images = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r", shape=(count, 3, size, size))
        self.labels = np.load(self.folder / "labels.npy", allow_pickle=False)
        self.domain_of = np.load(self.folder / "domains.npy", allow_pickle=False)
        self.view_labels = tuple(self.manifest["class_labels"])

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def labelled(self) -> bool:
        return bool(self.manifest["classes"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def domain_sizes(self) -> list[int]:
        """Images per domain, in the domains' order."""
        return np.bincount(self.domain_of, minlength=len(self.domains)).tolist()

    def source(self, domain: str | None = None) -> UploadSource:
        """Every image (``None``), or one domain's, in the upload's order."""
        if domain is None:
            return UploadSource(self, np.arange(len(self)), "your images")
        index = self.domains.index(domain)
        return UploadSource(self, np.flatnonzero(self.domain_of == index), domain)

    def summary(self) -> str:
        """What was found, in one sentence: "412 images in 3 domains (day, dusk, night), 10 classes matched to the
        model's, 2 files skipped: notes.txt (not an image), broken.jpg (truncated)"."""
        m = self.manifest
        domains = m["domains"]
        where = f"in {len(domains)} domains ({', '.join(domains)})" if len(domains) > 1 else "in one domain"
        text = f"{m['count']:,} image{'' if m['count'] == 1 else 's'} {where}, "
        classes = len(np.unique(self.labels[self.labels != UNLABELLED]))  # of the images kept
        text += f"{classes} class{'' if classes == 1 else 'es'} matched to the model's" if classes else "no labels"
        skipped = m["skipped"]
        if skipped:
            listed = ", ".join(f"{name.rsplit('/', 1)[-1]} ({why})" for name, why in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            text += f", {len(skipped)} file{'' if len(skipped) == 1 else 's'} skipped: {listed}{more}"
        return text


def _key(fingerprint: str, view: ModelView, labelled: bool) -> str:
    recipe = f"{_FORMAT}|{fingerprint}|{view.input_size}|{view.pad_small}|{view.classes_id}|{labelled}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:24]


def load_prepared(folder: str | os.PathLike) -> PreparedUpload:
    """A folder ``prepare_upload`` wrote (a readable error for anything else)."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():  # the message names no server path: a visitor may read it
        raise FileNotFoundError("your images are no longer on the server (their session ended): upload them again")
    return PreparedUpload(folder)


def prepare_upload(
    paths: Sequence[str | os.PathLike],
    view: ModelView,
    folder: str | os.PathLike,
    *,
    labelled: bool = True,
    limits: UploadLimits | None = None,
    progress: Progress | None = None,
) -> PreparedUpload:
    """The upload prepared for ``view`` under ``folder`` (made if needed), or the same preparation found there.
    ``UploadRefused`` says why an upload cannot be used; nothing of a refused upload is left behind."""
    limits = limits or UploadLimits.from_environment()
    folder = Path(folder)
    with list_upload(paths, limits) as upload:
        target = folder / _key(upload.fingerprint, view, labelled)
        if (target / "manifest.json").is_file():
            return PreparedUpload(target)
        layout = detect_layout(upload.files, view.classes, labelled=labelled)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".preparing-", dir=folder))
        try:
            _write(layout, view, staging, limits, progress)
            try:
                os.replace(staging, target)
            except OSError:  # the same upload, prepared meanwhile by another request: use that one
                if not (target / "manifest.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return PreparedUpload(target)


def _write(layout: Layout, view: ModelView, staging: Path, limits: UploadLimits, progress: Progress | None) -> None:
    """Decode every image (in threads: PIL releases the GIL while it decodes), append each kept one to the raw
    array file, and write labels, domains and the manifest."""
    budget = [limits.max_content_bytes]
    skipped = list(layout.skipped)
    labels, domains = [], []
    total = len(layout.images)
    with open(staging / "images.u8", "wb") as out, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        window = []
        for done, (file, domain, label) in enumerate(layout.images, start=1):
            try:
                data = read_limited(file, limits, budget)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError):  # a damaged member: its CRC or stream
                skipped.append((file.name, "damaged in the zip"))
                data = None
            if data is not None:
                decoding = pool.submit(_decode, file.name, data, view, limits.max_pixels)
                window.append((file.name, domain, label, decoding))
            if len(window) >= 32 or done == total:
                for name, domain_index, class_index, decoded in window:
                    result = decoded.result()
                    if isinstance(result, str):
                        skipped.append((name, result))
                        continue
                    out.write(result.numpy().tobytes())
                    labels.append(UNLABELLED if class_index is None else class_index)
                    domains.append(domain_index)
                window = []
                if progress is not None:
                    progress(done, total)
    if not labels:
        raise UploadRefused(f"none of the upload's {total} images could be read ({skipped[0][1]}, …)")
    kept = sorted(set(domains))
    if len(kept) < len(layout.domains):  # a domain whose every image was unreadable is no domain
        renumber = {old: new for new, old in enumerate(kept)}
        domains = [renumber[d] for d in domains]
    np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.save(staging / "domains.npy", np.asarray(domains, dtype=np.int64))
    manifest = {
        "format": _FORMAT,
        "kind": layout.kind,
        "domains": [layout.domains[d] for d in kept],
        "count": len(labels),
        "size": view.input_size,
        "classes_id": view.classes_id,
        "classes": layout.classes,
        "class_labels": list(view.classes.labels),
        "skipped": skipped,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest))
