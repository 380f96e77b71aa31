"""Where the shipped assets live: inside the installed package, or the repository's ``assets/`` folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["asset_path"]

_CANDIDATES = (
    Path(__file__).resolve().parent / "assets",  # a wheel built from this repository
    Path(__file__).resolve().parent.parent / "assets",  # a checkout or an editable install
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
