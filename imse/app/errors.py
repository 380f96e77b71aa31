"""No visitor reads "upstream app has raised an exception": every event's unexpected error becomes a sentence.

``readable_events(blocks)`` wraps every event function of the page once it is built (the Lab's Start, stories and
Stop, the upload check, every Teach view, page loads), whatever module wired it: an error a handler did not turn into
a ``gr.Error`` itself reaches the page as what failed, that the server logged it, and what to try; the server logs
its traceback. A ``gr.Error`` (a readable refusal) passes as it is.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

__all__ = ["readable", "readable_error", "readable_events", "what_failed"]

LOG = logging.getLogger("imse.app")
# what a visitor was doing, by the handler's name; any other handler is named by its own words
_DOING = {
    "start_lab": "The run",
    "load_preset": "Loading the story",
    "stop_lab": "Stopping the run",
    "check_upload": "Reading your images",
    "open_page": "Opening the page",
}


def what_failed(fn: Callable) -> str:
    """How a sentence names a handler's work: ``_DOING``'s words, a Teach view's ("The Teach view step view"), or
    its name's words."""
    fn = getattr(fn, "func", fn)  # a functools.partial: the function it calls
    name = getattr(fn, "__name__", "event")
    if name in _DOING:
        return _DOING[name]
    module = getattr(fn, "__module__", "") or ""
    words = name.replace("_", " ").strip() or "event"
    return f"The Teach view '{words}'" if ".teach" in module else f"'{words}'"


def readable_error(doing: str, error: BaseException) -> gr.Error:
    """The sentence a visitor reads for an unexpected error while ``doing``."""
    detail = str(error).strip() or "no message"
    return gr.Error(
        f"{doing} failed unexpectedly ({type(error).__name__}: {detail[:300]}). The server logged the details; try "
        "again, or change a setting (a smaller run, another method or backbone). If it keeps failing, please report "
        "it with the settings you chose.",
        print_exception=False,
    )


def readable(fn: Callable) -> Callable:
    """``fn`` with its unexpected errors logged and turned into a sentence (a generator stays a generator, so Gradio
    streams it as before; ``functools.wraps`` keeps the signature Gradio reads its inputs from)."""
    doing = what_failed(fn)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streamed(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as error:
                LOG.exception("%s failed", doing)
                raise readable_error(doing, error) from None

        return streamed

    @functools.wraps(fn)
    def called(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            LOG.exception("%s failed", doing)
            raise readable_error(doing, error) from None

    return called


def readable_events(blocks: gr.Blocks) -> None:
    """Wrap every event function of ``blocks`` (after it is built, before it serves) with ``readable``."""
    for block_fn in blocks.fns.values():
        if block_fn.fn is not None and not getattr(block_fn.fn, "_readable", False):
            block_fn.fn = readable(block_fn.fn)
            block_fn.fn._readable = True
