"""Writing files so that a crash or a concurrent reader never sees half a file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

__all__ = ["save_safetensors_atomic"]


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """Write to a temporary file next to ``path`` (unique per process and thread), then rename over it: the
    rename is atomic, so readers see the old file or the new one, never a partial one."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
