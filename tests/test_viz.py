"""The live panels: valid Plotly figures (checked by plotly's own validation), the numbers they show, small."""

import copy
import dataclasses
import json

import pytest

from imse import viz
from imse.lab import LabConfig, run_lab, summary_rows

LIVE = (viz.accuracy_figure, viz.alignment_figure, viz.shift_figure, viz.bank_figure, viz.batch_figure)


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
    assert titles[3] == "Domain bank" and "current batch" in titles[4]


def test_accuracy_bars_are_the_per_domain_accuracies_of_the_results_table(finished_state):
    headers, rows = summary_rows(finished_state)
    bars = [trace for trace in viz.accuracy_figure(finished_state)["data"] if trace["type"] == "bar"]
    assert [bar["name"] for bar in bars] == [row[0] for row in rows]
    for bar, row in zip(bars, rows):
        assert bar["x"] == [d["name"] for d in finished_state.domains]
        assert [round(v, 1) for v in bar["y"]] == row[1:-1]


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
