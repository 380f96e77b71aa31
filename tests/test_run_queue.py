"""The server's run queue: order, slots, each waiting visitor's place and expected wait, computed by hand."""

import threading
import time

import pytest

from imse.app.run_queue import QueueFull, RunQueue, expected_start


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_expected_start_is_when_enough_slots_have_come_free():
    # two slots free in 3 s and 8 s; ahead, runs of 10 s and 4 s: they start at 3 and 8, end at 13 and 12
    assert expected_start([8.0, 3.0], [10.0, 4.0], slots=2) == 12.0
    assert expected_start([8.0, 3.0], [], slots=2) == 3.0
    assert expected_start([5.0], [], slots=2) == 0.0  # a slot is free
    assert expected_start([], [6.0, 6.0, 6.0], slots=2) == 6.0


def test_places_and_waits_follow_the_order_the_runs_came_in():
    """The rate is machine-seconds per unit of work: two runs computing at once each get half of every second, and
    while anyone waits each run ahead takes `slots` (here 2) times its machine-seconds."""
    clock = Clock()
    queue = RunQueue(slots=2, places=3, seconds_per_work=0.5, clock=clock)
    a, b = queue.join(20), queue.join(40)  # 10 and 20 machine-seconds: both compute at once
    c, d = queue.join(10), queue.join(30)  # 5 and 15 machine-seconds: they wait
    assert queue.counts() == (2, 2)
    assert queue.place(a) is None and queue.place(b) is None
    clock.now += 4  # a and b have had 2 machine-seconds each: a has 8 left, 16 s at half the machine; b 18, 36 s
    assert queue.place(c) == (1, 16.0)
    assert queue.place(d) == (2, 26.0)  # c takes a's slot at 16 s and ends at 16 + 2 x 5 = 26 s, before b's at 36 s
    e = queue.join(2)
    with pytest.raises(QueueFull):
        queue.join(2)
    clock.now += 16  # a and b have had 10 machine-seconds each
    queue.leave(a, completed=True)  # 10 machine-seconds for 20 units: 0.5, the rate it had
    assert queue.seconds_per_work == 0.5
    assert queue.place(c) is None  # c computes in a's slot: 5 machine-seconds, 10 s; b has 10 left, 20 s
    assert queue.place(d) == (1, 10.0)
    assert queue.place(e) == (2, 20.0)  # d takes c's slot at 10 s and ends at 40 s; b's slot frees at 20 s
    assert queue.counts() == (2, 2)
    clock.now += 3  # c and b share: 1.5 machine-seconds each; c has 3.5 left, 7 s
    assert queue.place(d) == (1, 7.0)


def test_the_rate_is_the_median_of_the_last_runs_so_one_slow_run_does_not_skew_it():
    """The first run after a start waits for the workers' warm-up: 4 machine-seconds a unit, then runs take 1."""
    clock = Clock()
    queue = RunQueue(slots=1, places=1, seconds_per_work=1.0, clock=clock)
    rates = []
    for seconds in (4, 1, 1, 1, 1, 1, 1):
        run = queue.join(1)
        clock.now += seconds
        queue.leave(run, completed=True)
        rates.append(queue.seconds_per_work)
    assert rates == [4, 2.5, 1, 1, 1, 1, 1]  # halving towards each run (the rule before) said 2.5, 1.75, 1.38, 1.19


def test_a_run_alone_and_runs_in_a_crowd_teach_the_same_rate():
    """A run with the machine to itself took 12 s for 6 units: 2 machine-seconds each. Behind two such runs sharing
    the machine the next waits 2 x 12 s (a rate learned from wall time told 12 s, half the wait), and the two,
    each 24 s in wall time, teach the same rate as the run alone."""
    clock = Clock()
    queue = RunQueue(slots=2, places=4, seconds_per_work=2.0, clock=clock)
    alone = queue.join(6)
    clock.now += 12
    queue.leave(alone, completed=True)
    assert queue.seconds_per_work == 2.0
    first, second, waiter = queue.join(6), queue.join(6), queue.join(6)
    assert queue.place(waiter) == (1, 24.0)
    clock.now += 24
    queue.leave(first, completed=True)
    queue.leave(second, completed=True)
    assert queue.seconds_per_work == 2.0 and queue.place(waiter) is None


def test_a_visitor_who_leaves_while_waiting_frees_its_place_and_the_next_moves_up():
    clock = Clock()
    queue = RunQueue(slots=1, places=2, seconds_per_work=1.0, clock=clock)
    running, first, second = queue.join(10), queue.join(10), queue.join(10)
    assert queue.place(second)[0] == 2
    queue.leave(first)  # disconnected while waiting
    assert queue.place(second) == (1, 10.0)
    queue.leave(running, completed=False)  # stopped: the rate is not learned from it
    assert queue.seconds_per_work == 1.0 and queue.place(second) is None  # admitted


def test_waiting_yields_places_until_admitted_by_another_thread():
    queue = RunQueue(slots=1, places=1, seconds_per_work=1.0)
    running, waiting = queue.join(5), queue.join(5)
    threading.Timer(0.3, queue.leave, args=(running,)).start()
    places = list(queue.waiting(waiting, poll=0.1))
    assert places and all(place == 1 for place, _ in places)
    assert queue.place(waiting) is None and queue.counts() == (1, 0)


def test_a_waiter_is_told_news_at_once_but_not_every_join_that_wakes_it():
    """Each update a waiting visitor receives costs the server its outputs' postprocessing: joins behind it, which
    wake every waiter, tell it nothing; a move up tells it at once, long before the next poll."""
    queue = RunQueue(slots=1, places=10, seconds_per_work=1.0)
    running, ahead, waiter = queue.join(5), queue.join(5), queue.join(5)
    told = []
    reader = threading.Thread(target=lambda: told.extend(place for place, _ in queue.waiting(waiter, poll=30.0)))
    reader.start()
    for _ in range(5):  # others arrive behind it: each join wakes it
        queue.join(5)
        time.sleep(0.02)
    assert told == [2]
    moved = time.monotonic()
    queue.leave(ahead)
    while len(told) < 2 and time.monotonic() - moved < 5:
        time.sleep(0.01)
    assert told == [2, 1] and time.monotonic() - moved < 5  # told at once, not after the 30 s poll
    queue.leave(running)
    reader.join(timeout=5)
    assert not reader.is_alive() and told == [2, 1] and queue.place(waiter) is None


def test_gradios_queue_polls_every_50_ms_not_every_millisecond_and_a_renamed_setting_is_loud():
    """An idle server took 4.4 % of a core polling every millisecond (docs/hosting.md); ``app.py`` calls this."""
    import gradio as gr

    from imse.app.serving import QUEUE_POLL_SECONDS, quiet_queue

    with gr.Blocks() as demo:
        gr.Markdown("x")
    demo.queue()
    assert demo._queue.sleep_when_free <= QUEUE_POLL_SECONDS  # gradio's own: 1 ms (50 ms on Windows)
    quiet_queue(demo._queue)
    assert demo._queue.sleep_when_free == demo._queue.progress_update_sleep_when_free == QUEUE_POLL_SECONDS
    with pytest.raises(AttributeError, match="no sleep_when_free any more"):
        quiet_queue(object())
