"""Writing files so that a crash or a concurrent reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch

__all__ = ["save_safetensors_atomic", "write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file next to ``path`` (``.<name>.<pid>.<thread>.tmp``), flush it to the disk, then
    rename it over ``path``: the rename is atomic, so readers (and a process killed mid-save) see the old file or
    the new one, never a partial one; the temporary file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename points at it (else a power cut can empty it)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable; not every platform can sync a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """Safetensors written with ``write_atomic``."""
    from safetensors.torch import save

    return write_atomic(path, save(tensors, metadata=metadata))
