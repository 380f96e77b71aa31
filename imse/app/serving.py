"""Serving the app to the public: server-side limits and which runs belong to which browser session (giving memory
back when a run ends is ``imse.runs.memory``).

The limits are the host's settings (environment variables), never something a visitor can change:

- ``IMSE_MAX_RUN_SECONDS`` (600): a run stops after this long, with the results so far;
- ``IMSE_MAX_CONCURRENT_RUNS`` (2): runs computing at once; more wait in the queue;
- ``IMSE_MAX_QUEUE`` (16): requests waiting at most; the next one is refused with "queue full";
- ``IMSE_EXPORT_MAX_AGE`` (3600): seconds a run's download, and a visitor's prepared upload, is kept on disk (an
  upload goes as soon as its browser session ends);
- ``IMSE_ZEROGPU_MAX_SECONDS`` (120): the longest GPU call a ZeroGPU run may request (the daily allowance of a
  visitor who is not signed in); a larger run is refused before it starts (``imse.app.zerogpu``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

__all__ = [
    "SessionRuns",
    "forget_uploads",
    "prune_uploads",
    "upload_dir",
    "StopToken",
    "export_dir",
    "gpu_present",
    "zero_gpu",
    "limit",
    "prune_exports",
    "quiet_queue",
]

_DEFAULTS = {
    "IMSE_MAX_RUN_SECONDS": 600.0,
    "IMSE_MAX_CONCURRENT_RUNS": 2,
    "IMSE_MAX_QUEUE": 16,
    "IMSE_EXPORT_MAX_AGE": 3600.0,
    "IMSE_ZEROGPU_MAX_SECONDS": 120.0,
}


# Gradio's queue looks for new events every millisecond while it has nothing to do (50 ms on Windows:
# gradio/queueing.py ``sleep_when_free``) and for progress every 10 ms. An idle server so took 4.4 % of a core,
# which a run's OpenMP team in a worker feels on 2 cores. A Start now waits at most this much longer to begin.
QUEUE_POLL_SECONDS = 0.05


def quiet_queue(queue) -> None:
    """Poll Gradio's ``queue`` (``demo._queue`` once ``demo.queue()`` made it) every ``QUEUE_POLL_SECONDS`` at most.
    Refuses loudly if a Gradio release renamed the settings, rather than silently polling fast again."""
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        if not isinstance(getattr(queue, name, None), float):
            raise AttributeError(f"Gradio's queue has no {name} any more (see imse.app.serving.quiet_queue)")
        setattr(queue, name, max(getattr(queue, name), QUEUE_POLL_SECONDS))


def zero_gpu() -> bool:
    """A ZeroGPU Space (the Space sets ``SPACES_ZERO_GPU``): its GPU exists only inside ``@spaces.GPU`` calls."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true", "yes")


def gpu_present() -> bool:
    """A CUDA device now, or a ZeroGPU Space (CUDA is not really there outside its GPU calls)."""
    import torch

    return zero_gpu() or torch.cuda.is_available()


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


@functools.cache
def _scratch(kind: str) -> str:
    """A folder of this server process's, made when first needed (not at import): stop marks, downloads."""
    return tempfile.mkdtemp(prefix=f"imse-lab-{kind}-")


def export_dir() -> str:
    """Where finished runs' downloads go (pruned by ``prune_exports``)."""
    return _scratch("exports")


class StopToken:
    """A run's Stop flag that crosses processes: a file that exists once the run is asked to stop.

    On a ZeroGPU Space a run computes in a forked worker, which sees nothing the server process changes in
    memory after the fork; both see the same disk. The token pickles as its path, and a check is one ``stat``
    per batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def set(self) -> None:
        Path(self.path).touch()

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def clear(self) -> None:
        Path(self.path).unlink(missing_ok=True)

    def __eq__(self, other: object) -> bool:  # the same run's token, whichever process unpickled it
        return isinstance(other, StopToken) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __repr__(self) -> str:
        return f"StopToken({self.path!r}, set={self.is_set()})"


class SessionRuns:
    """Stop tokens of the runs each browser session has going: a closed tab or a Stop click sets them, and the
    run ends at its next batch, in this process or in a GPU worker (Gradio's own cancellation only stops
    *asking* a generator for more)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, set[StopToken]] = {}
        self._count = 0

    def start(self, session: str) -> StopToken:
        with self._lock:
            self._count += 1
            token = StopToken(os.path.join(_scratch("stops"), f"run-{os.getpid()}-{self._count}"))
            self._runs.setdefault(session, set()).add(token)
        return token

    def finish(self, session: str, token: StopToken) -> None:
        with self._lock:
            tokens = self._runs.get(session, set())
            tokens.discard(token)
            if not tokens:
                self._runs.pop(session, None)
        token.clear()

    def stop(self, session: str) -> int:
        """Ask every run of ``session`` to stop; returns how many there were."""
        with self._lock:
            tokens = list(self._runs.get(session, ()))
        for token in tokens:
            token.set()
        return len(tokens)

    def active(self) -> int:
        with self._lock:
            return sum(len(tokens) for tokens in self._runs.values())


def upload_dir(session: str) -> Path:
    """The folder a browser session's uploads are prepared in (``imse.data.uploads``): nothing of an upload is
    written anywhere else. Named by a digest of the session, so no visitor's string becomes a path."""
    folder = Path(_scratch("uploads")) / hashlib.sha256(session.encode()).hexdigest()[:32]
    folder.mkdir(exist_ok=True)
    os.utime(folder)  # in use: the age-based prune counts from the last use
    return folder


def forget_uploads(session: str) -> None:
    """A session ended: its prepared uploads go with it."""
    folder = Path(_scratch("uploads")) / hashlib.sha256(session.encode()).hexdigest()[:32]
    shutil.rmtree(folder, ignore_errors=True)


def prune_uploads(max_age: float) -> int:
    """Delete the upload folders of sessions unused for ``max_age`` seconds (a tab that never said goodbye)."""
    removed = 0
    for folder in Path(_scratch("uploads")).iterdir():
        try:
            if time.time() - folder.stat().st_mtime > max_age:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


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
