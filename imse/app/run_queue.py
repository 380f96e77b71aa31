"""Who computes now and who waits, for the runs this server process computes, with each waiting visitor's place
and an estimated wait.

Gradio's own queue shows a waiting visitor its rank but estimates the wait from the time to a generator's *first*
update, which for a streamed run is a second, not the run: the last of a dozen visitors saw nothing for 37 s. So
runs enter their event at once and wait here instead, in order, told every second where they stand
(``RunQueue.waiting``). At most ``slots`` compute at once; a run's cost is estimated from its size (images ×
methods) at the rate finished runs measured, and the wait is when that many slots will have come free.

Runs computing at once share the cores, so the rate is learned in seconds of the whole machine: a second shared
by two runs counts half a second to each. While anyone waits every slot is busy, so each run ahead takes
``slots`` times its machine-seconds. (A rate learned from wall time mixed the two: runs timed alone taught it,
then a crowd's runs took twice that, and visitors were told half their wait.)
"""

from __future__ import annotations

import collections
import heapq
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["QueueFull", "RunQueue", "Ticket", "expected_start"]

RATE_RUNS = 5  # the rate is the median over this many of the last finished runs


class QueueFull(RuntimeError):
    """Every waiting place is taken."""


@dataclass(eq=False)
class Ticket:
    """One run's place: its size (image × method passes) and, once admitted, the machine-seconds it has had."""

    work: float
    number: int
    machine_seconds: float = 0.0  # each second shared by n computing runs counts 1/n


def expected_start(remaining: list[float], ahead: list[float], slots: int) -> float:
    """Seconds until a run can start: ``remaining`` are the running runs' seconds left, ``ahead`` the waiting runs'
    durations in order; each run takes the first slot that comes free."""
    free = sorted(remaining)[:slots] + [0.0] * max(slots - len(remaining), 0)
    heapq.heapify(free)
    for duration in ahead:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return free[0]


class RunQueue:
    """First come, first served admission of at most ``slots`` runs at once, ``places`` waiting at most."""

    def __init__(self, slots: int, places: int, seconds_per_work: float, clock: Callable[[], float] = time.monotonic):
        self.slots, self.places = slots, places
        self.seconds_per_work = seconds_per_work  # machine-seconds: the prior, until runs have finished
        # the median of the last few finished runs: one slow outlier (the first run after a start, which waits for
        # the workers' warm-up) does not skew the estimates that follow
        self._measured: collections.deque[float] = collections.deque(maxlen=RATE_RUNS)
        self._clock = clock
        self._lock = threading.Condition()
        self._running: list[Ticket] = []
        self._waiting: list[Ticket] = []
        self._numbers = itertools.count()
        self._shared_until = clock()

    def estimate(self, ticket: Ticket) -> float:
        """The run's machine-seconds: what it would take with the machine to itself."""
        return ticket.work * self.seconds_per_work

    def _share(self) -> None:
        """Credit the running runs with their share of the time since the last change (under the lock)."""
        now = self._clock()
        for ticket in self._running:
            ticket.machine_seconds += (now - self._shared_until) / len(self._running)
        self._shared_until = now

    def join(self, work: float) -> Ticket:
        with self._lock:
            if len(self._waiting) >= self.places and len(self._running) >= self.slots:
                raise QueueFull(f"the queue is full ({self.places} runs waiting); try again in a minute")
            ticket = Ticket(work=work, number=next(self._numbers))
            self._share()
            self._waiting.append(ticket)
            self._admit()
            return ticket

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.slots:
            self._running.append(self._waiting.pop(0))
        self._lock.notify_all()

    def place(self, ticket: Ticket) -> tuple[int, float] | None:
        """``(place in line from 1, seconds until it starts)`` while it waits; None once admitted or gone."""
        with self._lock:
            if ticket not in self._waiting:
                return None
            self._share()
            shared = self.slots  # someone waits, so every slot computes: each run gets 1/slots of the machine
            remaining = [max(self.estimate(t) - t.machine_seconds, 0.5) * shared for t in self._running]
            index = self._waiting.index(ticket)
            ahead = [self.estimate(t) * shared for t in self._waiting[:index]]
            return index + 1, expected_start(remaining, ahead, self.slots)

    def waiting(self, ticket: Ticket, poll: float = 1.0) -> Iterator[tuple[int, float]]:
        """Yield the ticket's place at once, then when it moves up or ``poll`` seconds have passed, until it is
        admitted. Every join and leave wakes all waiters; each tells its visitor only news, since each update
        a visitor receives costs the server its outputs' postprocessing (~5–8 ms on 2 cores): a dozen
        visitors arriving at once woke each waiter a dozen times in their first second."""
        told = self.place(ticket)
        while told is not None:
            yield told
            deadline = self._clock() + poll
            with self._lock:
                while ticket in self._waiting and self._waiting.index(ticket) + 1 == told[0]:
                    left = deadline - self._clock()
                    if left <= 0:
                        break
                    self._lock.wait(left)
            told = self.place(ticket)

    def leave(self, ticket: Ticket, completed: bool = False) -> None:
        """Give the place or slot back; a completed run's machine-seconds per unit of work teach the rate."""
        with self._lock:
            self._share()
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            elif ticket in self._running:
                self._running.remove(ticket)
                if completed and ticket.work > 0:
                    self._measured.append(ticket.machine_seconds / ticket.work)
                    self.seconds_per_work = statistics.median(self._measured)
            self._admit()

    def counts(self) -> tuple[int, int]:
        """(computing, waiting)."""
        with self._lock:
            return len(self._running), len(self._waiting)
