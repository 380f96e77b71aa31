"""Where files live: the shipped assets (inside the installed package, or the repository's ``assets/`` folder)
and the cache for downloads and SVD factors."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["asset_path", "default_cache_dir", "offline"]

_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "assets",  # a wheel built from this repository (imse/assets)
    Path(__file__).resolve().parents[2] / "assets",  # a checkout or an editable install
)


def asset_path(*parts: str) -> Path:
    """Path of a shipped asset; a clear error if the package was installed without its assets."""
    for root in _CANDIDATES:
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"asset {'/'.join(parts)} not found under {' or '.join(str(c) for c in _CANDIDATES)}; "
        "reinstall imse-lab from a complete checkout"
    )


def default_cache_dir() -> Path:
    """Where downloaded data and cached SVD factors live: ``$IMSE_CACHE``, else ``~/.cache/imse``."""
    configured = os.environ.get("IMSE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "imse"


def offline() -> bool:
    """Whether this machine is told to stay off the network: ``HF_HUB_OFFLINE`` (the Hugging Face libraries' own
    switch) or ``IMSE_OFFLINE`` set to 1, true, yes or on. Weights, data and the hub probe all ask here."""
    switches = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "IMSE_OFFLINE"))
    return any(value in ("1", "true", "yes", "on") for value in switches)
