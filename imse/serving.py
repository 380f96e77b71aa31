"""Serving the app to the public: server-side limits, which runs belong to which browser session, and giving
memory back when a run ends.

The limits are the host's settings (environment variables), never something a visitor can change:

- ``IMSE_MAX_RUN_SECONDS`` (600): a run stops after this long, with the results so far;
- ``IMSE_MAX_CONCURRENT_RUNS`` (2): runs computing at once; more wait in the queue;
- ``IMSE_MAX_QUEUE`` (16): requests waiting at most; the next one is refused with "queue full";
- ``IMSE_EXPORT_MAX_AGE`` (3600): seconds a run's download is kept on disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import threading
import time
from pathlib import Path

__all__ = [
    "SessionRuns",
    "gpu_present",
    "keep_freed_memory",
    "limit",
    "prune_exports",
    "release_memory",
    "resident_bytes",
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


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the process instead of unmapping it: by default every large tensor is a
    fresh ``mmap``, so each adaptation step page-faults all its activations in again — measured on ViT-B/16 at
    batch 32 on 2 CPU cores, 18–22 % of an IMSE step (which allocates ~1.5× SAR's memory). ``release_memory``
    still hands everything back at the end of a run. Called by the CLI; not by the app: a long-lived server's
    resident size then wandered 916–988 MiB over identical runs (864–891 without; measured before the trim
    threshold became -1, not since), and its steady level matters more there. Returns False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # mallopt parameter numbers (malloc.h)
        return bool(
            libc.mallopt(m_mmap_max, 0)
            and libc.mallopt(m_trim_threshold, -1)  # -1: never trim (a C int: 1 << 40 was masked to 0)
            and libc.mallopt(m_top_pad, 256 << 20)
        )
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Collect the finished run's objects and hand freed heap pages back to the OS (glibc keeps them
    otherwise, and a long-lived server's resident size would only ever grow)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): the allocator decides
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resident_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident set size of a process (Linux), in bytes; ``field="VmHWM"`` gives its peak instead."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


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
