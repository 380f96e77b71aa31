"""No visitor reads "upstream app has raised an exception": an unexpected error in any event reaches the page as a
sentence (what failed, that the server logged it, what to try), and the server logs its traceback."""

from __future__ import annotations

import importlib.util
import logging
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def served(monkeypatch_module):
    """The app's own Blocks (app.py, loaded afresh once a method whose step raises is registered, as a contributor's
    method would be), served in this process."""
    from imse.core import methods as registry
    from imse.core.methods.source import Source

    class Exploding(Source):
        name, label = "exploding", "Exploding"

        @torch.no_grad()
        def step(self, x):
            raise KeyError("no such step")  # what a lookup of a name no table lists raises deep in a run

    monkeypatch_module.setitem(registry.METHODS, "exploding", Exploding)
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("app_for_test_errors", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.demo.launch(server_port=port, prevent_thread_lock=True, show_error=False, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.demo.close()


def test_a_method_whose_step_raises_is_a_sentence_on_the_page_and_a_traceback_in_the_log(served, caplog):
    from gradio_client import Client

    _, url = served
    with caplog.at_level(logging.ERROR, logger="imse.app"), pytest.raises(Exception) as failed:
        Client(url, verbose=False).predict(methods=["Exploding"], per_domain=64, corruptions=["fog"], api_name="/start")
    message = str(failed.value)
    assert "The run failed unexpectedly (KeyError: 'no such step'). The server logged the details; try again" in message
    assert "upstream" not in message
    logged = [record for record in caplog.records if record.name == "imse.app"]
    assert logged and logged[-1].exc_info is not None and "no such step" in str(logged[-1].exc_info[1])


def test_every_event_of_the_page_is_wrapped_lab_teach_preset_and_stop(served):
    app, _ = served
    names = {getattr(getattr(fn.fn, "__wrapped__", None), "__name__", None) for fn in app.demo.fns.values()}
    assert {"start_lab", "stop_lab", "check_upload", "open_page"} <= names
    assert all(getattr(fn.fn, "_readable", False) for fn in app.demo.fns.values() if fn.fn is not None)


def test_a_teach_view_that_raises_says_which_view_failed(caplog):
    import gradio as gr

    from imse.app.errors import readable

    def step_view(**_):
        raise IndexError("list index out of range")

    step_view.__module__ = "imse.app.teach"
    with caplog.at_level(logging.ERROR, logger="imse.app"), pytest.raises(gr.Error) as failed:
        readable(step_view)(layer=1)
    assert failed.value.message.startswith(
        "The Teach view 'step view' failed unexpectedly (IndexError: list index out of range). The server logged"
    )
    assert caplog.records[-1].exc_info is not None

    def refused():
        raise gr.Error("k must be a whole number")

    with pytest.raises(gr.Error) as passed:  # a readable refusal passes as it is
        readable(refused)()
    assert passed.value.message == "k must be a whole number"
