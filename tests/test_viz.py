"""The live panels: valid Plotly figures (checked by plotly's own validation), the numbers they show, small."""

import copy
import dataclasses
import json

import pytest

from imse.app import viz
from imse.app.lab_results import summary_rows
from imse.runs.lab import LabConfig, run_lab

LIVE = (
    viz.accuracy_figure,
    viz.collapse_figure,
    viz.alignment_figure,
    viz.shift_figure,
    viz.bank_figure,
    viz.batch_figure,
)


@pytest.fixture(scope="module")
def finished_state():
    config = LabConfig(
        corruptions=("fog", "gaussian_noise", "contrast"),
        per_domain=128,
        methods=("IMSE + retrieval (top-1)", "Source"),
    )
    states = list(run_lab(config, min_interval=0.0))
    assert states[-1].finished
    return states[-1]


def test_live_panels_are_valid_plotly_figures_and_small(finished_state):
    payload = 0
    for build in LIVE:
        figure = build(finished_state)
        figure.to_plotly()  # plotly validates every property name and value: raises on a bad spec
        decoded = json.loads(figure.to_json())
        assert decoded["data"] and decoded["layout"]["template"]["layout"]  # the default look is kept
        payload += len(figure.to_json())
    assert payload < 200_000
    titles = [build(finished_state).title for build in LIVE]
    assert titles[0].startswith("Online accuracy — batch 6/6, 384 images")
    assert titles[1].startswith("Collapse") and titles[4] == "Domain bank" and "current batch" in titles[5]


def test_accuracy_bars_are_the_per_domain_accuracies_of_the_results_table(finished_state):
    headers, rows = summary_rows(finished_state)
    bars = [trace for trace in viz.accuracy_figure(finished_state)["data"] if trace["type"] == "bar"]
    assert [bar["name"] for bar in bars] == [row[0] for row in rows]
    domains = len(finished_state.domains)
    assert headers[1 + domains :] == [
        "mean", "vs Source (pts)", "expert std", "top-class share (%)", "trainable values", "× IMSE's"
    ]  # fmt: skip
    for bar, row in zip(bars, rows):
        assert bar["x"] == [d["name"] for d in finished_state.domains]
        assert [round(v, 1) for v in bar["y"]] == row[1 : 1 + domains]


def test_the_accuracy_panel_states_each_methods_gain_over_source_so_far(finished_state):
    state = finished_state
    label = "IMSE + retrieval (top-1)"
    gain = 100 * (state.correct[label][-1] - state.correct["Source"][-1]) / state.images
    lines = [trace for trace in viz.accuracy_figure(state)["data"] if trace["type"] == "scatter"]
    assert lines[0]["name"] == f"{label}: {gain:+.1f} pts vs Source" and lines[1]["name"] == "Source"
    assert f"IMSE + retrieval {gain:+.1f}" in viz.accuracy_figure(state).title
    headers, rows = summary_rows(state)
    assert rows[0][headers.index("vs Source (pts)")] == round(gain, 2)


def test_the_shift_panel_names_the_frozen_rows_and_shows_norm_ratios(finished_state):
    heatmap = viz.shift_figure(finished_state)["data"][0]
    frozen = [row for row in heatmap["y"] if row.endswith("· frozen")]
    assert len(frozen) == 12 and all(row.startswith(("b3", "b4", "b5")) for row in frozen)  # the last 3 of 6 blocks
    history = finished_state.shift_history[-1]
    assert all(0.0 <= value < 1.0 for value in history) and history[-1] == 0.0  # frozen layers never move
    assert max(history) > 0.0


def test_non_finite_values_become_gaps_not_invalid_json(finished_state):
    state = dataclasses.replace(
        finished_state,
        shift_rel=copy.deepcopy(finished_state.shift_rel),
        shift_history=copy.deepcopy(finished_state.shift_history),
        shift_scores=list(finished_state.shift_scores),
    )
    state.shift_rel[0][0] = float("nan")
    state.shift_history[-1][0] = float("inf")
    state.shift_scores[1] = float("nan")
    for build in (viz.shift_figure, viz.bank_figure):
        text = build(state).to_json()  # allow_nan=False: NaN/inf would raise here
        assert "NaN" not in text and "Infinity" not in text
    heatmap = json.loads(viz.shift_figure(state).to_json())["data"][0]
    assert heatmap["z"][0][0] is None


def test_empty_and_unstarted_panels():
    for title in ("Online accuracy", "Domain bank"):
        figure = viz.empty_figure(title)
        figure.to_plotly()
        assert figure.title == title and json.loads(figure.to_json())["data"] == []


def test_a_recurring_run_draws_one_bar_per_domain_visit():
    """Rounds revisit domains: each visit gets its own bar (bars sharing a label would be drawn as one)."""
    config = LabConfig(
        scenario="recurring", rounds=2, corruptions=("fog", "contrast"), per_domain=64, methods=("Source",)
    )
    *_, state = run_lab(config, min_interval=0.0)
    (bar,) = [trace for trace in viz.accuracy_figure(state)["data"] if trace["type"] == "bar"]
    assert bar["x"] == ["fog-2", "contrast-2", "fog-2 (2)", "contrast-2 (2)"]
    _, (row,) = summary_rows(state)
    assert [round(v, 1) for v in bar["y"]] == row[1:5]


def test_the_results_table_counts_each_methods_adapted_values_against_imses():
    """Each row's trainable values are its method's own count (ViDA's every weight and adapter, DPAL's prompts,
    predictors and LayerNorms), and the ratio column divides by IMSE's count."""
    config = LabConfig(corruptions=("fog",), per_domain=16, batch_size=16, methods=("IMSE", "ViDA", "DPAL", "Source"))
    *_, state = run_lab(config, min_interval=0.0)
    headers, rows = summary_rows(state)
    counts = {label: method.num_trainable() for label, method in state.final_methods.items()}
    assert counts["Source"] == 0 and counts["ViDA"] > counts["DPAL"] > counts["IMSE"] > 0
    for row in rows:
        assert row[headers.index("trainable values")] == counts[row[0]]
        assert row[headers.index("× IMSE's")] == round(counts[row[0]] / counts["IMSE"], 1)
