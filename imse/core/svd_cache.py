"""A disk cache of SVD factors, so that decomposing a ViT-B (14 s of float64 SVD on two cores) happens once.

Entries are keyed by a SHA-256 of the weight's bytes, its dtype and shape: the same weights give the same
factors, whichever model or process asks. Files are written atomically (temporary file + rename), so processes
can share the cache; each file carries its key and a CRC-32 of its factors (names, dtypes, shapes and bytes), and
an entry that fails either (a disk error, a truncated copy, an entry copied under another name) is deleted and
recomputed, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from pathlib import Path

import torch

from imse.core.files import save_safetensors_atomic

__all__ = ["SVDCache", "decompose", "default_svd_cache"]

_FORMAT = "imse-svd/2"


def decompose(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64, factors returned in the weight's dtype and device."""
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return U.to(weight.dtype), S.to(weight.dtype), Vh.to(weight.dtype)


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 of each factor's name, dtype, shape and bytes: a header edit that keeps the bytes (another dtype or
    a transposed shape) fails it as much as damaged bytes do."""
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        crc = zlib.crc32(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode(), crc)
        crc = zlib.crc32(tensor.view(torch.uint8).numpy().tobytes(), crc)
    return crc


class SVDCache:
    """Cached ``decompose``: ``cache.decompose(weight)`` returns what ``decompose(weight)`` would."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self.rejected = 0

    def key(self, weight: torch.Tensor) -> str:
        cpu = weight.detach().to("cpu").contiguous()
        digest = hashlib.sha256(cpu.view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps([str(cpu.dtype), list(cpu.shape)]).encode())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
            if metadata.get("format") != _FORMAT or metadata.get("key") != path.stem:
                raise ValueError("not this entry")
            if int(metadata["crc32"]) != _crc(tensors):
                raise ValueError("checksum mismatch")
            return tensors["U"], tensors["S"], tensors["Vh"]
        except Exception:  # unreadable, truncated or altered: drop it and recompute
            self.rejected += 1
            with contextlib.suppress(OSError):  # one that cannot be removed is still not used
                path.unlink(missing_ok=True)
            return None

    def decompose(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = self.key(weight)
        path = self.path(key)
        if path.exists():
            factors = self._load(path)
            if factors is not None:
                self.hits += 1
                return tuple(f.to(weight.device) for f in factors)
        self.misses += 1
        U, S, Vh = decompose(weight)
        tensors = {"U": U.cpu().contiguous(), "S": S.cpu().contiguous(), "Vh": Vh.cpu().contiguous()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(tensors, path, {"format": _FORMAT, "key": key, "crc32": str(_crc(tensors))})
        except OSError:  # a read-only or full disk must not stop the decomposition
            pass
        return U, S, Vh


def default_svd_cache() -> SVDCache | None:
    """``$IMSE_SVD_CACHE``, else ``<IMSE cache>/svd`` (``$IMSE_CACHE`` or ``~/.cache/imse``); ``IMSE_SVD_CACHE=off``
    disables caching."""
    configured = os.environ.get("IMSE_SVD_CACHE")
    if configured and configured.lower() in ("off", "0", "false", "none"):
        return None
    if configured:
        return SVDCache(configured)
    from imse.core.resources import default_cache_dir

    return SVDCache(default_cache_dir() / "svd")
