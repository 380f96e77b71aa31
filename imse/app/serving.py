"""Serving the app to the public: server-side limits and which runs belong to which browser session (giving memory
back when a run ends is ``imse.runs.memory``).

The limits are the host's settings (environment variables), never something a visitor can change:

- ``IMSE_MAX_RUN_SECONDS`` (600): a run stops after this long, with the results so far;
- ``IMSE_MAX_CONCURRENT_RUNS`` (2): runs computing at once; more wait in the queue;
- ``IMSE_MAX_QUEUE`` (16): requests waiting at most; the next one is refused with "queue full";
- ``IMSE_EXPORT_MAX_AGE`` (3600): seconds a run's download is kept on disk.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

__all__ = [
    "SessionRuns",
    "gpu_present",
    "limit",
    "prune_exports",
]

_DEFAULTS = {
    "IMSE_MAX_RUN_SECONDS": 600.0,
    "IMSE_MAX_CONCURRENT_RUNS": 2,
    "IMSE_MAX_QUEUE": 16,
    "IMSE_EXPORT_MAX_AGE": 3600.0,
}


def gpu_present() -> bool:
    """A CUDA device now, or a ZeroGPU Space (its GPU is attached only inside ``@spaces.GPU`` calls, so CUDA is
    not visible at start-up; the Space sets ``SPACES_ZERO_GPU``)."""
    import torch

    zero_gpu = os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "true", "yes")
    return zero_gpu or torch.cuda.is_available()


def limit(name: str) -> float | int:
    """A limit from the environment, else its default; a malformed or non-positive value is an error at start-up
    rather than a silently unlimited server."""
    default = _DEFAULTS[name]
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = type(default)(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {type(default).__name__}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


class SessionRuns:
    """Stop flags of the runs each browser session has going: a closed tab or a Stop click sets them, and the
    run ends at its next batch (Gradio's own cancellation only stops *asking* a generator for more)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._runs.setdefault(session, set()).add(flag)
        return flag

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            flags = self._runs.get(session, set())
            flags.discard(flag)
            if not flags:
                self._runs.pop(session, None)

    def stop(self, session: str) -> int:
        """Ask every run of ``session`` to stop; returns how many there were."""
        with self._lock:
            flags = list(self._runs.get(session, ()))
        for flag in flags:
            flag.set()
        return len(flags)

    def active(self) -> int:
        with self._lock:
            return sum(len(flags) for flags in self._runs.values())


def prune_exports(directory: str | Path, max_age: float) -> int:
    """Delete run downloads older than ``max_age`` seconds under ``directory``; returns how many."""
    removed = 0
    now = time.time()
    for entry in Path(directory).glob("run-*"):
        try:
            if now - entry.stat().st_mtime > max_age:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        except FileNotFoundError:  # removed by a concurrent prune
            pass
    return removed
