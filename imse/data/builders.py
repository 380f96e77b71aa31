"""Which images a run streams: a data name to a source, and the clean images that describe a bank's slot 0.

Shared by the CLI's runs and the app's Lab (they used to live in ``bench.py``, which the Lab then imported).
"""

from __future__ import annotations

import torch

from imse.core.images import as_float_images
from imse.data.backbones import BUILTIN_DATA, IMAGENET_DATA, backbone_data

__all__ = [
    "UPLOAD",
    "build_source",
    "class_subset",
    "for_data",
    "local_upload",
    "resolve_data",
    "slot0_source",
    "source_images",
    "stream_parts",
    "upload_folder",
]

UPLOAD = "upload:"  # data named "upload:<folder>": a user's images, prepared in that folder (imse.data.uploads)


def build_source(data: str, backbone_name: str, size: int, progress=None):
    """``builtin`` (the shipped Fashion-MNIST test split), ``imagenette`` (downloaded once, cached; ``progress``
    follows the download), ``imagenet-r:<root>`` / ``imagenet-a:<root>`` (their 200 classes, labelled 0–199 as
    ``RestrictedLogits`` answers), ``upload:<folder>`` (a user's images, prepared: ``imse.data.uploads``), or the
    path of a folder or ``.zip`` of one's own images (prepared as an upload: ``local_upload``)."""
    from imse.data.sources import ImageFolderSource, imagenette_source

    if (folder := upload_folder(data)) is not None:
        from imse.data.uploads import load_prepared

        return load_prepared(folder).source()
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
    return build_source(local_upload(data, backbone_name), backbone_name, size)


def resolve_data(data: str, backbone: str, *, labelled: bool = True) -> str:
    """The data a run names, with a path of one's own (a folder or ``.zip``) prepared as an upload (``local_upload``);
    every other name as it is."""
    own = data not in (BUILTIN_DATA, IMAGENET_DATA) and not class_subset(data) and upload_folder(data) is None
    return local_upload(data, backbone, labelled=labelled) if own else data


def local_upload(path: str, backbone: str, *, labelled: bool = True) -> str:
    """A folder or ``.zip`` of the user's own (the CLI's ``--data PATH``) as ``upload:<folder>``: checked and
    prepared once for ``backbone`` (the same layouts and rules as the Lab's uploads, ``imse.data.uploads``) under
    the cache's ``uploads`` folder, with a progress bar; found there the next time."""
    from pathlib import Path

    from imse.core.resources import default_cache_dir
    from imse.data.models import model_view
    from imse.data.upload_files import UploadLimits
    from imse.data.uploads import prepare_upload

    where = Path(path).expanduser()
    if not where.exists():
        raise FileNotFoundError(f"no image folder or zip {where}")
    bar = _Bar(f"preparing {where.name}")
    try:
        upload = prepare_upload([where], model_view(backbone), default_cache_dir() / "uploads", labelled=labelled,
                                limits=UploadLimits.from_environment(local=True), progress=bar.update)  # fmt: skip
    finally:
        bar.close()
    return UPLOAD + str(upload.folder)


class _Bar:
    """A terminal progress bar (tqdm, shown on terminals only), opened at the first update."""

    def __init__(self, what: str) -> None:
        self.what, self.bar = what, None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.what, unit="image", disable=None)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def upload_folder(data: str) -> str | None:
    """The prepared folder of ``upload:<folder>``, else None."""
    return data.removeprefix(UPLOAD) if isinstance(data, str) and data.startswith(UPLOAD) else None


def stream_parts(data: str, source, upload_streams: str, scenario: str, rounds: int) -> dict:
    """What a ``Stream`` reads, as keywords: ``source`` (clean images to corrupt); for a user's upload streamed as
    it is, its own domains instead, each read from ``pregenerated(domain)``. The Lab and bench both build their
    streams from here, so the same upload and settings stream the same batches."""
    folder = upload_folder(data)
    if folder is None:
        return {"source": source}
    from imse.data.streams import own_domains
    from imse.data.uploads import AS_IS, load_prepared

    upload = load_prepared(folder)
    if upload_streams != AS_IS:
        return {"source": upload.source()}
    domains = own_domains(upload.domains, scenario, rounds)
    return {"source": None, "pregenerated": lambda domain: upload.source(domain.corruption), "domains": domains}


def slot0_source(parts: dict):
    """The clean images that describe the bank's slot 0 (``source_images``) for a stream's parts: the images the
    corruptions start from, or, for one's own domains as they are, the first domain (in name order: the nearest
    thing to a source an upload has)."""
    return parts["source"] if parts.get("source") is not None else parts["pregenerated"](parts["domains"][0])


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
