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
    clock = Clock()
    queue = RunQueue(slots=2, places=3, seconds_per_work=0.5, clock=clock)
    a, b = queue.join(20), queue.join(40)  # 10 s and 20 s: both compute at once
    c, d = queue.join(10), queue.join(30)  # 5 s and 15 s: they wait
    assert queue.counts() == (2, 2)
    assert queue.place(a) is None and queue.place(b) is None
    clock.now += 4  # a has 6 s left, b 16 s
    assert queue.place(c) == (1, 6.0)
    assert queue.place(d) == (2, 11.0)  # c takes a's slot at 6 s and ends at 11 s, before b frees its slot at 16 s
    e = queue.join(2)
    with pytest.raises(QueueFull):
        queue.join(2)
    queue.leave(a, completed=True)  # took 4 s for 20 units: the rate becomes (0.5 + 0.2) / 2
    assert queue.seconds_per_work == pytest.approx(0.35)
    assert queue.place(c) is None  # c computes in a's slot: 3.5 s left; b has 40 x 0.35 - 4 = 10 s left
    assert queue.place(d) == (1, pytest.approx(3.5))
    assert queue.place(e) == (2, pytest.approx(10.0))  # d takes c's slot at 3.5 s; b's slot frees first, at 10 s
    assert queue.counts() == (2, 2)


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
