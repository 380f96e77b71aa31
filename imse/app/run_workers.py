"""CPU runs computed in worker processes, started with the server and kept warm.

A run computing in a thread of the server process took ~20 % longer per IMSE step than the same step alone on
2 cores (the built-in model, batch 64: median 547–609 ms against 443–472 ms in a process of its own, paired in
one sitting); the server's threads (its event loop wakes every millisecond, the update relay) share the run's
interpreter and cores. A worker process holds only the run. Workers are spawned (not forked: GNU OpenMP,
which the server's torch has used, is not fork-safe) when the server starts, one per computing slot, and each
warms itself with a tiny run, so the first visitor waits for neither imports nor an SVD.

Everything that crosses is pickled: the ``LabConfig``, ``StopToken`` files and a folder's path in; the
updates of ``lab_stream.lab_updates``, download progress and ``gr.Error`` out. The server's ``RunQueue`` lets
at most as many runs compute as there are workers, and those take the cores in turn, a batch each (``Turns``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import gradio as gr

from imse.app import serving
from imse.runs.lab import LabConfig

__all__ = ["RunWorkers"]

_DEAD_CHECK_SECONDS = 5.0  # how often a waiting server looks whether its worker is still alive


class Turns:
    """Workers' runs compute one batch at a time, in turn (first come, first served; ``take`` / ``give``).

    Results must not depend on who else is running. A run's float32 reductions round by how many threads
    compute them (SAR's and TENT's LayerNorm gradients differ in the last bits between 1 and 2 threads), so runs
    that split the cores between them drift from what each gives alone. Taken in turn, every batch gets all the
    cores and the same thread count whatever the load, and the machine's total work stays that of the runs back
    to back. A visitor's run waits at most one batch of another's between its own."""

    def __init__(self, context, capacity: int) -> None:
        self._changed = context.Condition()
        self._line = context.Array("i", capacity, lock=False)  # pids: the head computes, the rest wait
        self._length = context.Value("i", 0, lock=False)

    def take(self) -> None:
        """Join the line (if not in it) and wait until this process is at its head."""
        me = os.getpid()
        with self._changed:
            if me not in self._line[: self._length.value]:
                self._line[self._length.value] = me
                self._length.value += 1
            self._changed.wait_for(lambda: self._line[0] == me)

    def give(self) -> None:
        """Leave the line: the next in it computes."""
        self.forget(os.getpid())

    def forget(self, pid: int) -> None:
        """Take ``pid`` out of the line (the server does it for a worker that died holding or awaiting a turn)."""
        with self._changed:
            line = [held for held in self._line[: self._length.value] if held != pid]
            self._line[: len(line)] = line
            self._length.value = len(line)
            self._changed.notify_all()


class _BetweenBatches:
    """What a worker's run asks between batches (``run_lab``'s ``should_stop``): whether to stop (the visitor's
    Stop, or nobody listening any more), after it has given its turn and taken the next one (``Turns``)."""

    def __init__(self, turns: Turns, *flags: serving.StopToken) -> None:
        self.turns, self.flags = turns, flags

    def is_set(self) -> bool:
        self.turns.give()
        self.turns.take()
        return any(flag.is_set() for flag in self.flags)


def _exit_with(parent: int) -> None:
    """End this worker once the server that started it is gone (killed: no one would ever send a task)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _serve(tasks, results, turns: Turns, parent: int) -> None:
    """A worker's life: warm up, then run each task, sending every message to ``results``."""
    from imse.app.lab_stream import lab_updates

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()

    def downloading(done: int, total: int | None) -> None:
        results.put(("download", (done, total)))

    warm = LabConfig(corruptions=("fog",), per_domain=64, methods=("IMSE", "Source"))
    never = serving.StopToken(os.devnull + ".never")  # a path that never exists: the warm-up runs through
    with tempfile.TemporaryDirectory(prefix="imse-warm-up-") as scratch:  # its download is nobody's
        try:
            for _ in lab_updates(warm, False, _BetweenBatches(turns, never), scratch):  # in turn with runs
                pass
        finally:
            turns.give()
    results.put(("ready", os.getpid()))
    while (task := tasks.get()) is not None:
        config, show_source, stop, abandoned, exports = task
        try:
            between = _BetweenBatches(turns, stop, abandoned)  # a run's first turn comes after its first batch
            for update in lab_updates(config, show_source, between, exports, downloading):
                results.put(("update", update))
            results.put(("end", None))
        except BaseException as error:  # noqa: BLE001 (a gr.Error crosses whole; anything else as its text)
            if not isinstance(error, gr.Error):
                error = gr.Error(f"the run failed: {type(error).__name__}: {error}")
            results.put(("error", error))
        finally:
            turns.give()


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
    def __init__(self, context, turns: Turns) -> None:
        self.tasks, self.results = context.Queue(), context.Queue()
        self.pending: list[tuple[str, object]] = []  # a message read ahead while looking for newer updates
        arguments = (self.tasks, self.results, turns, os.getpid())
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
        self._turns = Turns(self._context, slots)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(slots):
            self._idle.put(_Worker(self._context, self._turns))

    def updates(
        self,
        config: LabConfig,
        show_source: bool,
        stop: serving.StopToken,
        exports: str,
        on_download: Callable[[int, int | None], None] | None = None,
    ) -> Iterator[tuple]:
        """``lab_updates`` of the run, computed by a worker. The worker never waits for the page: when several
        updates are ready, only the newest goes on. A caller that stops listening halts the run at its next
        batch, and the worker is idle again before this generator has closed."""
        worker = self._idle.get()  # the run queue admits a run only when a slot, hence a worker, is free
        if not worker.process.is_alive():  # died while idle (or warming up)
            self._turns.forget(worker.process.pid)
            worker = _Worker(self._context, self._turns)
        abandoned = serving.StopToken(stop.path + ".abandoned")
        finished = False
        try:
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
        if not worker.process.is_alive():
            self._turns.forget(worker.process.pid)  # it may have died holding its turn
            worker = _Worker(self._context, self._turns)
        self._idle.put(worker)
