"""A Lab run as the page receives it: the status line, the panels, the results table and the download.

This is the part of Start that computes, kept free of the visitor's request, progress bar and session, so that it
runs the same in the server process and in a ZeroGPU worker (``imse.app.zerogpu``), where its arguments and every
value it yields are pickled between processes: a ``LabConfig``, plain flags, a ``StopToken`` and a folder's path
in; tuples of strings, figure dicts and ``gr.update`` dicts out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr

from imse.app import serving, viz
from imse.app.lab_results import export_run, summary_rows, verdict
from imse.data.models import BackboneUnavailable
from imse.runs.lab import LabConfig, run_lab
from imse.runs.memory import release_memory

__all__ = ["OUTPUTS", "PANEL_TITLES", "lab_updates", "panels"]

PANEL_TITLES = (
    "Online accuracy",
    "Collapse",
    "Expert alignment std",
    "Singular-value shifts",
    "Domain bank",
    "The current batch",
)
# what each update holds, in order (app.py wires its components by these names; /start answers in this order)
OUTPUTS = ("status", "accuracy", "collapse", "alignment", "shifts", "bank", "batch", "results", "download")


def panels(state, show_source: bool) -> tuple:
    return (
        viz.accuracy_figure(state),
        viz.collapse_figure(state),
        viz.alignment_figure(state, show_source),
        viz.shift_figure(state),
        viz.bank_figure(state),
        viz.batch_figure(state),
    )


def _status(state) -> str:
    """The status line: where the run is; once finished, what happened, in one sentence."""
    if state.finished:
        return f"**{state.message}.** {verdict(state)}"
    return (
        f"**{state.message or 'running'}** — batch {state.batch}/{state.total_batches}, "
        f"{state.images:,} images, {state.seconds:.1f} s"
    )


def lab_updates(
    config: LabConfig,
    show_source: bool,
    stop: serving.StopToken,
    exports: str,
    on_download: Callable[[int, int | None], None] | None = None,
) -> Iterator[tuple]:
    """Stream a validated run's updates (``OUTPUTS`` order), about once a second; the last one carries the
    results table and the zip written under ``exports``. ``stop`` ends the run at its next batch. Failures a
    visitor can cause come out as ``gr.Error`` (which also crosses a ZeroGPU worker whole)."""
    hidden = gr.update(visible=False)  # results and download appear when the run has finished
    state = None
    try:
        runs = run_lab(
            config,
            time_limit=serving.limit("IMSE_MAX_RUN_SECONDS"),
            should_stop=stop.is_set,
            on_download=on_download,
        )
        for state in runs:
            if not state.finished:
                yield (_status(state), *panels(state, show_source), hidden, gr.update(value=None, visible=False))
                continue
            headers, rows = summary_rows(state)
            table = gr.update(value=rows, headers=headers, visible=True)
            serving.prune_exports(exports, serving.limit("IMSE_EXPORT_MAX_AGE"))
            archive = export_run(state, exports)
            yield (_status(state), *panels(state, show_source), table, gr.update(value=str(archive), visible=True))
    except (ValueError, BackboneUnavailable, RuntimeError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    finally:
        state = None  # the last update (its plain-data records) goes before the trim
        release_memory()
