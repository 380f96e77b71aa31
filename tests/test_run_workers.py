"""CPU runs in the server's warm worker processes (imse.app.run_workers): real spawned processes, real queues."""

import json
import multiprocessing
import os
import signal
import zipfile

import gradio as gr
import pytest

from imse.app.lab_stream import OUTPUTS
from imse.app.run_workers import RunWorkers
from imse.app.serving import StopToken
from imse.runs.lab import LabConfig, run_lab

CONFIG = LabConfig(corruptions=("fog", "contrast"), per_domain=128, batch_size=32, severity=3)


@pytest.fixture(scope="module")
def workers():
    return RunWorkers(1)


def _children() -> set[int]:
    """The pids of this process's live child processes (the workers among them)."""
    return {child.pid for child in multiprocessing.active_children()}


def _records(update: tuple) -> list:
    download = update[OUTPUTS.index("download")]["value"]
    with zipfile.ZipFile(download) as archive:
        return json.loads(archive.read("records.json"))["records"]


@pytest.mark.slow  # spawns and warms a worker (~10 s); the default suite's app tests run through workers too
def test_a_run_in_a_worker_equals_the_same_run_here_and_the_worker_serves_the_next(workers, tmp_path):
    pids = _children()
    assert pids and os.getpid() not in pids
    updates = list(workers.updates(CONFIG, False, StopToken(str(tmp_path / "stop")), str(tmp_path)))
    assert updates[-1][0].startswith("**finished: 256 images")
    *_, state = run_lab(CONFIG, min_interval=0.0)
    correct = [{label: m["correct"] for label, m in r["methods"].items()} for r in _records(updates[-1])]
    assert correct == [{label: m["correct"] for label, m in r["methods"].items()} for r in state.records]
    assert _children() == pids  # warm: the same process served it, and nothing new was spawned


@pytest.mark.slow  # stops a long run mid-stream
def test_a_page_that_stops_listening_halts_the_workers_run_within_a_batch(workers, tmp_path):
    stop = StopToken(str(tmp_path / "stop"))
    long_run = LabConfig(per_domain=10_000)  # ~4 min if it went on
    stream = workers.updates(long_run, False, stop, str(tmp_path))
    next(stream)
    stream.close()  # returns once the worker has ended the run (it waits for the worker's "end")
    assert not StopToken(stop.path + ".abandoned").is_set()
    quick = list(workers.updates(CONFIG, False, stop, str(tmp_path)))
    assert quick[-1][0].startswith("**finished")


@pytest.mark.slow  # stops a long run mid-stream
def test_the_visitors_stop_and_a_refused_setting_cross_the_process(workers, tmp_path):
    stop = StopToken(str(tmp_path / "stop"))
    stream = workers.updates(LabConfig(per_domain=10_000), False, stop, str(tmp_path))
    next(stream)
    stop.set()
    assert all(not update[0].startswith("**finished") for update in stream)  # ends without a final state
    bad = LabConfig(per_domain=0)
    with pytest.raises(gr.Error, match="images per domain must be 1 to"):
        list(workers.updates(bad, False, StopToken(str(tmp_path / "other")), str(tmp_path)))


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_a_readable_message_and_is_replaced(tmp_path):
    others = _children()  # the module's pool, if another test started it
    workers = RunWorkers(1)
    stream = workers.updates(LabConfig(per_domain=10_000), False, StopToken(str(tmp_path / "stop")), str(tmp_path))
    next(stream)
    (running,) = _children() - others  # this pool's one worker, running the stream
    os.kill(running, signal.SIGKILL)
    with pytest.raises(gr.Error, match="worker process ended unexpectedly"):
        list(stream)
    again = list(workers.updates(CONFIG, False, StopToken(str(tmp_path / "stop2")), str(tmp_path)))
    assert again[-1][0].startswith("**finished")


def test_runs_computing_at_once_share_the_cores_and_a_run_alone_takes_them_all(tmp_path):
    import torch

    from imse.app.run_workers import _BetweenBatches

    computing = multiprocessing.get_context("spawn").Value("i", 1)
    between = _BetweenBatches(computing, StopToken(str(tmp_path / "stop")))
    before = torch.get_num_threads()
    try:
        between.cores = 4
        assert between.is_set() is False and torch.get_num_threads() == 4
        computing.value = 2
        assert between.is_set() is False and torch.get_num_threads() == 2
        computing.value = 5
        between.is_set()
        assert torch.get_num_threads() == 1
        (tmp_path / "stop").touch()
        assert between.is_set() is True
    finally:
        torch.set_num_threads(before)
