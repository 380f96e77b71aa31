"""CPU runs computed in worker processes, started with the server and kept warm.

A run computing in a thread of the server process took ~20 % longer per IMSE step than the same step alone on
2 cores (the built-in model, batch 64: median 547–609 ms against 443–472 ms in a process of its own, paired in
one sitting); the server's threads (its event loop wakes every millisecond, the update relay) share the run's
interpreter and cores. A worker process holds only the run. Workers are spawned (not forked: GNU OpenMP,
which the server's torch has used, is not fork-safe) when the server starts, one per computing slot, and each
warms itself with a tiny run, so the first visitor waits for neither imports nor an SVD.

Everything that crosses is pickled: the ``LabConfig``, ``StopToken`` files and a folder's path in; the
updates of ``lab_stream.lab_updates``, download progress and ``gr.Error`` out. The server's ``RunQueue`` lets
at most as many runs compute as there are workers.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import gradio as gr
import torch

from imse.app import errors, serving
from imse.runs.lab import LabConfig

__all__ = ["RunWorkers"]

_DEAD_CHECK_SECONDS = 5.0  # how often a waiting server looks whether its worker is still alive


class _BetweenBatches:
    """What a worker's run asks between batches (``run_lab``'s ``should_stop``): whether to stop (the visitor's
    Stop, or nobody listening any more), and, before it answers, how many cores this run may use now.

    Runs computing at once share the cores: two workers each with an OpenMP team as wide as the machine made a
    crowd of 12 visitors on 2 cores take 2.2x the time of their runs back to back (the teams' threads spin and
    wait on each other). Each run takes ``cores // runs computing`` threads, re-read every batch."""

    def __init__(self, computing, *flags: serving.StopToken) -> None:
        self.computing, self.flags = computing, flags
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def is_set(self) -> bool:
        threads = max(1, self.cores // max(1, self.computing.value))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return any(flag.is_set() for flag in self.flags)


def _exit_with(parent: int) -> None:
    """End this worker once the server that started it is gone (killed: no one would ever send a task)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _serve(tasks, results, computing, parent: int) -> None:
    """A worker's life: warm up, then run each task, sending every message to ``results``."""
    from imse.app.lab_stream import lab_updates

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    def downloading(done: int, total: int | None, what: str) -> None:
        results.put(("download", (done, total, what)))

    warm = LabConfig(corruptions=("fog",), per_domain=64, methods=("IMSE", "Source"))
    never = serving.StopToken(os.devnull + ".never")  # a path that never exists: the warm-up runs through
    with tempfile.TemporaryDirectory(prefix="imse-warm-up-") as scratch:  # its download is nobody's
        for _ in lab_updates(warm, False, never, scratch):
            pass
    results.put(("ready", os.getpid()))
    while (task := tasks.get()) is not None:
        config, show_source, stop, abandoned, exports = task
        try:
            between = _BetweenBatches(computing, stop, abandoned)
            between.is_set()  # this run's share of the cores from its first batch on
            for update in lab_updates(config, show_source, between, exports, downloading):
                results.put(("update", update))
            results.put(("end", None))
        except BaseException as error:  # noqa: BLE001 (a gr.Error crosses whole; anything else as a sentence)
            if not isinstance(error, gr.Error):
                logging.getLogger("imse.app").exception("The run failed in its worker")  # the server's stderr
                error = errors.readable_error("The run", error)
            results.put(("error", error))


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """A spawned child re-runs the parent's main script (``python app.py``: the whole page, a hub probe) unless
    that script has no ``__file__``; the worker needs nothing from it."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


class _Worker:
    def __init__(self, context, computing) -> None:
        self.tasks, self.results = context.Queue(), context.Queue()
        self.pending: list[tuple[str, object]] = []  # a message read ahead while looking for newer updates
        arguments = (self.tasks, self.results, computing, os.getpid())
        self.process = context.Process(target=_serve, args=arguments, daemon=True)
        with _main_not_reimported():
            self.process.start()

    def message(self) -> tuple[str, object]:
        """The worker's next message; a worker that died says so."""
        if self.pending:
            return self.pending.pop()
        while True:
            try:
                return self.results.get(timeout=_DEAD_CHECK_SECONDS)
            except queue.Empty:
                if not self.process.is_alive():
                    return ("died", self.process.exitcode)


class RunWorkers:
    """``slots`` warm worker processes; ``updates`` runs one Lab run in an idle one."""

    def __init__(self, slots: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._computing = self._context.Value("i", 0)  # runs computing now, shared with the workers
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(slots):
            self._idle.put(_Worker(self._context, self._computing))

    def updates(
        self,
        config: LabConfig,
        show_source: bool,
        stop: serving.StopToken,
        exports: str,
        on_download: Callable[[int, int | None, str], None] | None = None,
    ) -> Iterator[tuple]:
        """``lab_updates`` of the run, computed by a worker. The worker never waits for the page: when several
        updates are ready, only the newest goes on. A caller that stops listening halts the run at its next
        batch, and the worker is idle again before this generator has closed."""
        worker = self._idle.get()  # the run queue admits a run only when a slot, hence a worker, is free
        abandoned = serving.StopToken(stop.path + ".abandoned")
        finished = False
        try:
            with self._computing.get_lock():
                self._computing.value += 1
            worker.tasks.put((config, show_source, stop, abandoned, exports))
            while True:
                kind, value = self._newest(worker)
                if kind == "update":
                    yield value
                elif kind == "download" and on_download is not None:
                    on_download(*value)
                elif kind == "end":
                    finished = True
                    return
                elif kind == "error":
                    finished = True
                    raise value
                elif kind == "died":
                    raise gr.Error(f"the run's worker process ended unexpectedly (exit code {value}); try again")
        finally:
            self._release(worker, abandoned, finished)

    @staticmethod
    def _newest(worker: _Worker) -> tuple[str, object]:
        """The next message, or if more updates are already waiting, the newest of the updates in a row."""
        kind, value = worker.message()
        while kind == "update":
            try:
                following = worker.results.get_nowait()
            except queue.Empty:
                break
            if following[0] != "update":
                worker.pending.append(following)
                break
            kind, value = following
        return kind, value

    def _release(self, worker: _Worker, abandoned: serving.StopToken, finished: bool) -> None:
        if not finished and worker.process.is_alive():
            abandoned.set()  # nobody listens: end the run at its next batch, then wait for the worker
            while (kind := worker.message()[0]) not in ("end", "error", "died"):
                pass
            finished = kind != "died"
        abandoned.clear()
        with self._computing.get_lock():
            self._computing.value -= 1
        self._idle.put(worker if worker.process.is_alive() else _Worker(self._context, self._computing))
