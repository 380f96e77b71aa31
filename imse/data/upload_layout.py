"""Which layout an upload has, and which of the model's classes its folders name.

Three layouts, detected from where the images sit (a single top folder holding everything, as zipping a folder
makes, is looked through):

- ``images``: the images at the top — unlabelled, one domain;
- ``CLASS/images``: folders named after the model's classes — labelled, one domain;
- ``DOMAIN/images`` or ``DOMAIN/CLASS/images``: several domains, streamed in name order (labelled when their
  sub-folders name classes).

A folder names a class when it equals, ignoring case, spaces and underscores, one of the class's names: a WordNet id
(``n01440764``) or any of an ImageNet class's names (``tench``, ``Tinca tinca``), or a Fashion-MNIST name for the
built-in model. Folders one level down that name no class are taken as domains when none of them names one; a mix,
or class folders under domains that name none, is refused with the closest names — unless the visitor runs the
upload unlabelled, which ignores class folders.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from imse.data.upload_files import UploadFile, UploadRefused

__all__ = ["ClassMatch", "Layout", "class_key", "detect_layout", "match_classes"]

ONE_DOMAIN = "your images"
_LAYOUTS = "images; CLASS/images; DOMAIN/images; or DOMAIN/CLASS/images"


def class_key(name: str) -> str:
    """How names are compared: case, spaces and underscores ignored."""
    return re.sub(r"[\s_]+", "", name.lower())


@dataclass(frozen=True)
class ClassMatch:
    """The model's classes by key: each key to the class indices it names, and a name to show for each key."""

    indices: dict[str, set[int]]
    shown: dict[str, str]
    labels: tuple[str, ...]  # one readable name per class index

    @classmethod
    def of(cls, synonyms: Sequence[Sequence[str]]) -> ClassMatch:
        """``synonyms[i]``: every name of class ``i`` (the first is the one shown in tables)."""
        indices: dict[str, set[int]] = {}
        shown: dict[str, str] = {}
        for index, names in enumerate(synonyms):
            for name in names:
                for variant in (name, *name.split("/"), name.replace("/", "")):
                    key = class_key(variant)
                    if key:
                        indices.setdefault(key, set()).add(index)
                        shown.setdefault(key, variant.strip())
        labels = tuple(names[1] if len(names) > 1 and re.fullmatch(r"n\d{8}", names[0]) else names[0]
                       for names in synonyms)  # fmt: skip
        return cls(indices, shown, labels)

    def index(self, folder: str) -> int | None:
        """The class ``folder`` names, ``None`` when it names none; refused when it names several."""
        found = self.indices.get(class_key(folder), set())
        if len(found) > 1:
            which = ", ".join(f"{self.labels[i]} (class {i})" for i in sorted(found))
            raise UploadRefused(f"the folder {folder!r} names several classes ({which}): name it by its WordNet id")
        return next(iter(found), None)

    def closest(self, folder: str, count: int = 3) -> list[str]:
        near = difflib.get_close_matches(class_key(folder), list(self.indices), n=count, cutoff=0.5)
        return [self.shown[key] for key in near]


def match_classes(folders: Sequence[str], classes: ClassMatch) -> tuple[dict[str, int], list[str]]:
    """Each folder's class, and the folders that name none."""
    matched, strangers = {}, []
    for folder in folders:
        index = classes.index(folder)
        if index is None:
            strangers.append(folder)
        else:
            matched[folder] = index
    return matched, strangers


@dataclass
class Layout:
    """What an upload holds: its kind, its domains (in name order), each image's domain and class (``None``:
    unlabelled), and the files skipped with why."""

    kind: str  # "images", "CLASS/images", "DOMAIN/images", "DOMAIN/CLASS/images"
    domains: list[str]
    images: list[tuple[UploadFile, int, int | None]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # class folder -> class index

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _looked_through(files: list[UploadFile], classes: ClassMatch) -> tuple[list[UploadFile], str | None]:
    """Strip one top folder that holds every image and names no class (what zipping a folder makes)."""
    tops = {file.parts[0] for file in files}
    if len(tops) == 1 and all(len(file.parts) > 1 for file in files):
        (top,) = tops
        if classes.index(top) is None:
            return [_stripped(file) for file in files], top
    return files, None


def _stripped(file: UploadFile) -> UploadFile:
    return UploadFile(file.parts[1:], file.declared_bytes, file.compressed_bytes, file.open)


def _refuse_strangers(strangers: list[str], classes: ClassMatch, where: str) -> None:
    named = "; ".join(
        f"{folder!r}" + (f" (closest: {', '.join(near)})" if (near := classes.closest(folder)) else "")
        for folder in strangers[:4]
    )
    more = f" and {len(strangers) - 4} more" if len(strangers) > 4 else ""
    raise UploadRefused(
        f"{where} folders that match none of the model's classes: {named}{more}. Rename them, or run the upload "
        "unlabelled"
    )


def detect_layout(files: Sequence[UploadFile], classes: ClassMatch, *, labelled: bool = True) -> Layout:
    """The upload's layout (see the module's docstring). ``labelled=False``: class folders are ignored (one domain,
    or the domains above them)."""
    skipped = [(file.name, "not an image") for file in files if not file.is_image]
    images, top = _looked_through([file for file in files if file.is_image], classes)
    depths = sorted({len(file.parts) for file in images})
    if len(depths) > 1:
        counts = ", ".join(f"{sum(len(f.parts) == d for f in images)} at depth {d}" for d in depths)
        raise UploadRefused(f"mixed layout ({counts}): lay the upload out as {_LAYOUTS}")
    depth = depths[0]
    if depth > 3:
        raise UploadRefused(f"folders nest deeper than DOMAIN/CLASS/image: lay the upload out as {_LAYOUTS}")
    folders = sorted({file.parts[0] for file in images}) if depth > 1 else []
    if depth == 1 or (depth == 2 and not labelled and match_classes(folders, classes)[0]):
        return Layout("images", [top or ONE_DOMAIN], [(file, 0, None) for file in images], skipped)
    if depth == 2:
        matched, strangers = match_classes(folders, classes) if labelled else ({}, folders)
        if matched and strangers:
            _refuse_strangers(strangers, classes, "class")
        if matched:
            entries = [(file, 0, matched[file.parts[0]]) for file in images]
            return Layout("CLASS/images", [top or ONE_DOMAIN], entries, skipped, matched)
        position = {name: index for index, name in enumerate(folders)}
        return Layout("DOMAIN/images", folders, [(file, position[file.parts[0]], None) for file in images], skipped)
    return _domains_of_classes(images, folders, classes, labelled, skipped)


def _domains_of_classes(images, domains, classes, labelled, skipped) -> Layout:
    position = {name: index for index, name in enumerate(domains)}
    if not labelled:
        entries = [(file, position[file.parts[0]], None) for file in images]
        return Layout("DOMAIN/images", domains, entries, skipped)
    matched, strangers = match_classes(sorted({file.parts[1] for file in images}), classes)
    if strangers:
        _refuse_strangers(strangers, classes, "class")
    entries = [(file, position[file.parts[0]], matched[file.parts[1]]) for file in images]
    return Layout("DOMAIN/CLASS/images", domains, entries, skipped, matched)
