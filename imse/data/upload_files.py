"""A user's upload as a list of files, every classic attack refused before a byte is decompressed.

An upload is a ``.zip``, several image files, or (the CLI only) a folder. Nothing is ever extracted under a name
the archive chose: members are listed, checked and later read into memory one at a time, their bytes counted
as they are decompressed (a zip's headers can lie about sizes). Refused, each with one sentence (``UploadRefused``):
an upload over the size limit, more images than allowed, a bomb (content far larger than its compressed bytes, or
over the total allowed), members whose paths climb (``..``) or are absolute, symbolic links, nested archives,
encrypted members, an empty upload, and a file named ``.zip`` that is not one. Limits are host settings
(``UploadLimits.from_environment``; docs/hosting.md).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_SUFFIXES",
    "Upload",
    "UploadFile",
    "UploadLimits",
    "UploadRefused",
    "list_upload",
    "read_limited",
    "starts_like_an_archive",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".jar")
_ARCHIVE_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!", b"\x28\xb5\x2f\xfd")
_CHUNK = 1 << 16
_SYMLINK = 0o120000
_SMALL = 1 << 20  # a member this small is never called a bomb, whatever its ratio (a blank PNG compresses 1000x)


class UploadRefused(ValueError):
    """The upload cannot be used; the message is the sentence the visitor reads."""


def _env_number(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class UploadLimits:
    """The bounds an upload must stay within. ``None``: unbounded (the CLI on the user's own files)."""

    max_bytes: float | None = 200 * 2**20  # the upload as sent (a zip's compressed size, or the files' sum)
    max_images: float | None = 2000
    max_content_bytes: float | None = 1 * 2**30  # everything decompressed, counted while reading
    max_ratio: float = 100.0  # content bytes per compressed byte, per member (above _SMALL)
    max_pixels: float = 40_000_000  # per image, from its header, before decoding

    _ENVIRONMENT = {
        "max_bytes": "IMSE_MAX_UPLOAD_BYTES",
        "max_images": "IMSE_MAX_UPLOAD_IMAGES",
        "max_content_bytes": "IMSE_MAX_UPLOAD_CONTENT_BYTES",
        "max_ratio": "IMSE_MAX_UPLOAD_RATIO",
        "max_pixels": "IMSE_MAX_UPLOAD_PIXELS",
    }

    @classmethod
    def from_environment(cls, *, local: bool = False) -> UploadLimits:
        """The host's limits (each ``IMSE_MAX_UPLOAD_*`` variable, else its default). ``local``: the CLI reading
        the user's own files, where the size and count limits apply only when set."""
        defaults = cls()
        values = {}
        for name, variable in cls._ENVIRONMENT.items():
            default = getattr(defaults, name)
            if local and name in ("max_bytes", "max_images", "max_content_bytes"):
                default = None
            values[name] = _env_number(variable, default)
        return cls(**values)


@dataclass
class UploadFile:
    """One file of an upload: its path inside the upload (``parts``), its size as declared, and how to read it."""

    parts: tuple[str, ...]
    declared_bytes: int
    compressed_bytes: int
    open: Callable[[], object] = field(repr=False)  # a binary file object

    @property
    def name(self) -> str:
        return "/".join(self.parts)

    @property
    def is_image(self) -> bool:
        return self.parts[-1].lower().endswith(IMAGE_SUFFIXES)


def read_limited(file: UploadFile, limits: UploadLimits, budget: list[int]) -> bytes:
    """The file's bytes, counted as they are read: refused once it passes its own ratio bound or the upload's
    remaining content budget (``budget``, a one-item list of bytes left, shared by the upload's files)."""
    allowed = max(_SMALL, limits.max_ratio * max(file.compressed_bytes, 1))
    chunks, total = [], 0
    with file.open() as handle:
        while chunk := handle.read(_CHUNK):
            total += len(chunk)
            if total > allowed:
                raise UploadRefused(
                    f"{file.name} unpacks to more than {limits.max_ratio:.0f}× its compressed size: "
                    "refused as a zip bomb"
                )
            if budget[0] is not None and total > budget[0]:
                raise UploadRefused(
                    f"the upload unpacks to more than {limits.max_content_bytes / 2**20:.0f} MB: refused as a zip bomb"
                )
            chunks.append(chunk)
    if budget[0] is not None:
        budget[0] -= total
    return b"".join(chunks)


def _check_parts(raw: str) -> tuple[str, ...]:
    """A member's path as parts, refused when it is absolute or climbs out of the upload."""
    path = raw.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UploadRefused(f"the upload holds an absolute path ({raw[:80]!r}): refused")
    parts = tuple(part for part in PurePosixPath(path).parts if part not in ("", "."))
    if ".." in parts:
        raise UploadRefused(f"the upload holds a path that climbs out of it ({raw[:80]!r}): refused")
    return parts


def _ignored(parts: tuple[str, ...]) -> bool:
    """Hidden files and macOS's ``__MACOSX`` copies are system files, never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _zip_files(path: Path) -> tuple[list[UploadFile], zipfile.ZipFile]:
    """The members of a zip (kept open: each member is read from it later), checked as listed."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise UploadRefused(f"{path.name} is named .zip but is not a zip archive") from None
    files = []
    try:
        for info in archive.infolist():
            parts = _check_parts(info.filename)
            if (info.external_attr >> 16) & 0o170000 == _SYMLINK:
                raise UploadRefused(f"the upload holds a symbolic link ({info.filename[:80]}): refused")
            if info.flag_bits & 0x1:
                raise UploadRefused(f"the upload is encrypted ({info.filename[:80]}): upload an unencrypted zip")
            if info.is_dir() or not parts or _ignored(parts):
                continue
            files.append(UploadFile(parts, info.file_size, info.compress_size, lambda info=info: archive.open(info)))
    except BaseException:
        archive.close()
        raise
    return files, archive


def _plain_file(path: Path, parts: tuple[str, ...]) -> UploadFile:
    size = path.stat().st_size
    return UploadFile(parts, size, size, lambda: open(path, "rb"))


def _folder_files(root: Path) -> list[UploadFile]:
    """A folder's files (the CLI: the user's own disk, so links are followed as the user made them)."""
    files = []
    for directory, folders, names in os.walk(root, followlinks=True):
        folders.sort()
        for name in sorted(names):
            path = Path(directory) / name
            parts = path.relative_to(root).parts
            if not _ignored(parts) and path.is_file():
                files.append(_plain_file(path, parts))
    return files


@dataclass
class Upload:
    """An upload's files, checked and listed (a zip stays open until ``close``), and a fingerprint of what was sent:
    the same upload gives the same fingerprint, so its prepared images are found again instead of decoded again."""

    files: list[UploadFile]
    fingerprint: str
    archive: zipfile.ZipFile | None = None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fingerprint(paths: Sequence[Path], folder: bool) -> str:
    """SHA-256 of the bytes sent (names included, for several files); a folder (the CLI) by its files' names,
    sizes and modification times, so that it is not read twice."""
    digest = hashlib.sha256()
    if folder:
        for path in sorted(p for p in paths[0].rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(paths[0]).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK * 16):
                digest.update(chunk)
    return digest.hexdigest()


def _sent_files(paths: list[Path], limits: UploadLimits) -> tuple[list[UploadFile], zipfile.ZipFile | None]:
    """One zip or several plain files, as sent: readable, within the size limit, not a mix of both."""
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UploadRefused(f"{', '.join(missing[:3])} could not be read")
    size = sum(path.stat().st_size for path in paths)
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise UploadRefused(
            f"the upload is {size / 2**20:.1f} MB; this server takes at most {limits.max_bytes / 2**20:.0f} MB"
        )
    if size == 0:
        raise UploadRefused("the upload is empty: choose a .zip or image files")
    if any(p.suffix.lower() == ".zip" for p in paths):
        if len(paths) > 1:
            raise UploadRefused("upload one .zip, or image files, not both")
        return _zip_files(paths[0])
    other = [p.name for p in paths if p.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if other:  # sent as it is, not inside a zip: not a nested archive, an archive this server does not read
        raise UploadRefused(f"{other[0][:80]} is not a .zip: upload a .zip archive, or the image files themselves")
    return [_plain_file(p, (p.name,)) for p in paths], None


def _check_listed(files: list[UploadFile], limits: UploadLimits) -> None:
    nested = [file.name for file in files if file.parts[-1].lower().endswith(ARCHIVE_SUFFIXES)]
    if nested:
        raise UploadRefused(f"the upload holds an archive inside it ({nested[0][:80]}): nested archives are refused")
    images = sum(file.is_image for file in files)
    if images == 0:
        others = f"; it holds {len(files)} other file(s)" if files else ""
        raise UploadRefused(f"the upload holds no images (PNG, JPEG, WebP, BMP or GIF){others}")
    if limits.max_images is not None and images > limits.max_images:
        raise UploadRefused(f"the upload holds {images:,} images; this server takes at most {limits.max_images:,.0f}")


def list_upload(paths: Sequence[str | os.PathLike], limits: UploadLimits) -> Upload:
    """The files of an upload (one zip, several files, or one folder), in a stable order, after the structural
    checks; nothing is decompressed yet. Only image files count against ``max_images``."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UploadRefused("the upload is empty: choose a .zip or image files")
    folder = len(paths) == 1 and paths[0].is_dir()
    files, archive = (_folder_files(paths[0]), None) if folder else _sent_files(paths, limits)
    try:
        files.sort(key=lambda file: file.parts)
        _check_listed(files, limits)
        return Upload(files, _fingerprint(paths, folder), archive)
    except BaseException:
        if archive is not None:
            archive.close()
        raise


def starts_like_an_archive(data: bytes) -> bool:
    """Whether bytes begin as an archive does (a nested archive renamed ``photo.jpg``)."""
    return data.startswith(_ARCHIVE_MAGIC)
