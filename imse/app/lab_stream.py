"""A Lab run as the page receives it: the status line, the panels, the results table and the download.

This is the part of Start that computes, kept free of the visitor's request, progress bar and session, so that it
runs the same in the server process and in a ZeroGPU worker (``imse.app.zerogpu``), where its arguments and every
value it yields are pickled between processes: a ``LabConfig``, plain flags, a ``StopToken`` and a folder's path
in; tuples of strings, figure dicts and ``gr.update`` dicts out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from imse.app import serving, viz
from imse.app.lab_results import export_run, summary_rows, verdict
from imse.data.models import BackboneUnavailable
from imse.runs.lab import LabConfig, run_lab
from imse.runs.memory import release_memory

__all__ = ["OUTPUTS", "PANELS", "Panel", "lab_updates", "outputs", "panel_rows", "panels"]


@dataclass(frozen=True)
class Panel:
    """One figure of the Lab, all in one entry: the output's name (``/start`` answers by it), the title its figure
    shows before a run (``empty_title``; a run's figure titles itself), the plot's label on the page, what draws
    it from the run's ``LabState`` (and the "show the no-adaptation model" switch), the ``LabState`` fields it
    reads, and its row (a row's panels sit side by side)."""

    name: str
    empty_title: str
    label: str
    draw: Callable[[Any, bool], Any]
    reads: tuple[str, ...]
    row: int


PANELS: tuple[Panel, ...] = (
    Panel("accuracy", "Online accuracy", "Accuracy", lambda state, _: viz.accuracy_figure(state),
          ("correct", "seen", "domains", "methods"), row=0),
    Panel("collapse", "Collapse", "Collapse", lambda state, _: viz.collapse_figure(state),
          ("expert_std", "top_share", "domains", "methods"), row=1),
    Panel("alignment", "Expert alignment std", "Expert alignment std", viz.alignment_figure,
          ("alignment", "alignment_source", "layer_names"), row=2),
    Panel("shifts", "Singular-value shifts", "Singular-value shifts", lambda state, _: viz.shift_figure(state),
          ("shift_rel", "shift_history", "frozen_layers"), row=2),
    Panel("bank", "Domain bank", "Domain bank", lambda state, _: viz.bank_figure(state),
          ("shift_scores", "detections", "stored", "retrieved", "bank_size"), row=3),
    Panel("batch", "The current batch", "Current batch", lambda state, _: viz.batch_figure(state),
          ("thumbnails",), row=3),
)  # fmt: skip


def outputs(table: tuple[Panel, ...] = PANELS) -> tuple[str, ...]:
    """What each update holds, in order: the status line, every panel, the results table, the download (app.py
    wires its components by these names; ``/start`` answers in this order)."""
    return ("status", *(panel.name for panel in table), "results", "download")


OUTPUTS = outputs()


def panel_rows(table: tuple[Panel, ...] = PANELS) -> list[list[Panel]]:
    """The panels grouped by row, in row order (the page's layout)."""
    return [[panel for panel in table if panel.row == row] for row in sorted({panel.row for panel in table})]


def panels(state, show_source: bool, table: tuple[Panel, ...] = PANELS) -> tuple:
    return tuple(panel.draw(state, show_source) for panel in table)


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
    on_download: Callable[[int, int | None, str], None] | None = None,
    *,
    table: tuple[Panel, ...] = PANELS,
) -> Iterator[tuple]:
    """Stream a validated run's updates (``outputs(table)`` order), about once a second; the last one carries the
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
                yield (_status(state), *panels(state, show_source, table), hidden, gr.update(value=None, visible=False))
                continue
            headers, rows = summary_rows(state)
            serving.prune_exports(exports, serving.limit("IMSE_EXPORT_MAX_AGE"))
            archive = export_run(state, exports)
            results = gr.update(value=rows, headers=headers, visible=True)
            download = gr.update(value=str(archive), visible=True)
            yield (_status(state), *panels(state, show_source, table), results, download)
    except (ValueError, BackboneUnavailable, RuntimeError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None
    finally:
        state = None  # the last update (its plain-data records) goes before the trim
        release_memory()
