"""The live panels: valid Plotly figures (checked by plotly's own validation), the numbers they show, small."""

import copy
import dataclasses
import json

import pytest

from imse.app import accuracy_panel, viz
from imse.app.lab_results import summary_rows, verdict
from imse.runs.lab import LabConfig, LabState, run_lab

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
    bars = [trace for trace in viz.accuracy_figure(finished_state)["data"] if trace["xaxis"] == "x2"]
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
    lines = [trace for trace in viz.accuracy_figure(state)["data"] if trace["xaxis"] == "x"]
    assert lines[0]["name"] == f"{label}: {gain:+.1f} pts vs Source" and lines[1]["name"] == "Source"
    assert f"IMSE + retrieval {gain:+.1f}" in viz.accuracy_figure(state).subtitle
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
    (bar,) = [trace for trace in viz.accuracy_figure(state)["data"] if trace["type"] == "bar"]  # no gain row
    assert bar["x"] == ["fog-2", "contrast-2", "fog-2 (2)", "contrast-2 (2)"]
    _, (row,) = summary_rows(state)
    assert [round(v, 1) for v in bar["y"]] == row[1:5]


def test_the_results_table_counts_each_methods_adapted_values_against_imses():
    """Each row's trainable values are its method's own count (ViDA's every weight and adapter, DPAL's prompts,
    predictors and LayerNorms), hand-counted here from the built-in ViT's shapes (width 128, 6 blocks), and the
    ratio column is that count over IMSE's."""
    from imse.data.models import BUILTIN, create_backbone

    config = LabConfig(corruptions=("fog",), per_domain=16, batch_size=16, methods=("IMSE", "ViDA", "DPAL", "Source"))
    *_, state = run_lab(config, min_interval=0.0)
    assert config.backbone == BUILTIN
    d, depth = 128, 6
    weights = sum(p.numel() for p in create_backbone(BUILTIN).parameters())  # ViDA trains every weight
    counts = {
        "IMSE": 3 * 4 * d,  # S of qkv, proj, fc1, fc2 in blocks 0-2: rank d each
        "ViDA": weights + depth * (1 + 128) * ((d + 3 * d) + (d + d)),  # + rank 1 and 128 adapters by qkv, proj
        "DPAL": (d + (depth - 1) * d) + 3 * 2 * 2 * d + depth * 2 * (d * d + d),  # prompts, 3 blocks' norms, predictors
        "Source": 0,
    }
    ratios = {"IMSE": 1.0, "ViDA": 1043.6, "DPAL": 130.5, "Source": 0.0}  # 1,602,954 and 200,448 over 1,536
    headers, rows = summary_rows(state)
    assert sorted(row[0] for row in rows) == sorted(counts)
    for row in rows:
        assert row[headers.index("trainable values")] == counts[row[0]], row[0]
        assert row[headers.index("× IMSE's")] == ratios[row[0]], row[0]
    assert counts["ViDA"] == 1_602_954 and counts["DPAL"] == 200_448  # the ratios' numerators, as written above


def hand_made(methods=("IMSE", "TENT", "Source")) -> LabState:
    """Four batches of 50 images over two domains, with counts chosen by hand."""
    counts = {"IMSE": [40, 82, 120, 160], "TENT": [38, 77, 112, 150], "Source": [37, 75, 110, 148]}
    domains = [dict(name="fog-2", index=0, start=0, end=1), dict(name="snow-2", index=1, start=2, end=3)]
    return LabState(config={}, methods=list(methods), class_names=[str(c) for c in range(10)], batch=4,
                    total_batches=4, images=200, correct={m: counts[m] for m in methods}, seen=[50, 100, 150, 200],
                    domains=domains)  # fmt: skip


def traces(figure, axis: str) -> dict:
    return {trace["name"]: trace for trace in figure["data"] if trace["xaxis"] == axis}


def test_the_gain_row_draws_each_methods_points_over_source_on_an_axis_fitted_to_them():
    figure = viz.accuracy_figure(hand_made())
    figure.to_plotly()
    # by hand: IMSE − Source = 3, 7, 10, 12 images of 50, 100, 150, 200; TENT − Source = 1, 2, 2, 2
    running = traces(figure, "x3")
    assert list(running) == ["IMSE", "TENT"]  # Source is the zero line, not a trace
    assert running["IMSE"]["y"] == pytest.approx([6.0, 7.0, 20 / 3, 6.0])
    assert running["TENT"]["y"] == pytest.approx([2.0, 2.0, 4 / 3, 1.0])
    # per domain: IMSE 82 % and 78 %, TENT 77 % and 73 %, Source 75 % and 73 %
    accuracy, gains = traces(figure, "x2"), traces(figure, "x4")
    assert [v for m in ("IMSE", "TENT", "Source") for v in accuracy[m]["y"]] == pytest.approx([82, 78, 77, 73, 75, 73])
    assert gains["IMSE"]["y"] == pytest.approx([7.0, 5.0]) and gains["IMSE"]["text"] == ["+7.0", "+5.0"]
    assert gains["TENT"]["y"] == pytest.approx([2.0, 0.0]) and gains["TENT"]["text"] == ["+2.0", "+0.0"]
    layout = figure["layout"]
    low, high = layout["yaxis3"]["range"]
    assert low < 0 < 7.0 < high and (7.0 - 0) / (high - low) > 0.7  # the largest gain fills most of the axis
    assert layout["yaxis4"]["range"] == pytest.approx([-1.05, 8.05])
    zero = [s for s in layout["shapes"] if s.get("yref") in ("y3", "y4")]
    assert [(s["yref"], s["y0"], s["y1"], s["line"]["dash"]) for s in zero] == [(f"y{a}", 0, 0, "dash") for a in "34"]
    assert [t["name"] for t in traces(figure, "x").values()] == [
        "IMSE: +6.0 pts vs Source", "TENT: +1.0 pts vs Source", "Source"
    ]  # fmt: skip
    assert figure.subtitle == "gain over Source so far (points): IMSE +6.0; TENT +1.0"


def test_a_three_point_gain_fills_most_of_its_axis_where_accuracy_shows_it_as_a_sliver():
    low, high = accuracy_panel.fitted_range([0.4, 3.0, 2.2])
    assert (low, high) == pytest.approx((-0.45, 3.45))
    assert 3.0 / (high - low) > 0.75 and 3.0 / 100 < 0.05  # vs the accuracy axis, 0–100
    assert accuracy_panel.fitted_range([-2.0, -0.5]) == pytest.approx([-2.3, 0.3])  # below Source: zero stays in view
    # at least a point tall: noise is not magnified
    assert accuracy_panel.fitted_range([0.1]) == pytest.approx([-0.6, 0.7])


def test_without_source_or_alone_there_is_no_gain_row():
    for methods in (("IMSE", "TENT"), ("Source",)):
        figure = viz.accuracy_figure(hand_made(methods))
        assert {trace["xaxis"] for trace in figure["data"]} == {"x", "x2"}
        assert "yaxis3" not in figure["layout"] and figure.subtitle == ""
    empty = dataclasses.replace(hand_made(), seen=[], correct={m: [] for m in ("IMSE", "TENT", "Source")}, domains=[])
    assert {trace["xaxis"] for trace in viz.accuracy_figure(empty)["data"]} == {"x", "x2"}


def test_the_verdict_of_a_real_run_states_the_results_tables_numbers(finished_state):
    headers, rows = summary_rows(finished_state)
    (imse, source) = [row[headers.index("mean")] for row in rows]
    gain = round(imse, 1) - round(source, 1)
    words = "above" if gain > 0 else "below"
    expected = f"IMSE + retrieval (top-1) ended {abs(gain):.1f} points {words} Source ({imse:.1f} % vs {source:.1f} %)"
    if round(gain, 1) == 0:
        expected = f"IMSE + retrieval (top-1) ended level with Source ({imse:.1f} % each)"
    sentence = verdict(finished_state)
    assert sentence.startswith(expected + " over 384 images; the bank stored ")
    assert sentence.endswith(" of 2 changes).")  # fog → gaussian noise → contrast


def test_a_panel_is_one_entry_and_a_panel_added_in_a_test_is_drawn_in_every_update(tmp_path):
    """issue 26: the panel table drives the outputs and the updates; the page lays it out by rows (app.py)."""
    from dataclasses import fields

    from imse.app.lab_stream import PANELS, Panel, lab_updates, outputs, panel_rows
    from imse.app.serving import StopToken
    from imse.runs.lab import LabConfig, LabState

    state_fields = {field.name for field in fields(LabState)}
    assert all(set(panel.reads) <= state_fields for panel in PANELS)  # each entry names the state it reads
    shipped = [["accuracy"], ["collapse"], ["alignment", "shifts"], ["bank", "batch"]]  # the six, by rows
    names = {name for row in shipped for name in row}  # a panel a contributor adds may join any row
    rows = [[p.name for p in row if p.name in names] for row in panel_rows()]
    assert [row for row in rows if row] == shipped

    def images_seen(state, show_source):
        return {"data": [], "layout": {"title": {"text": f"{state.images} images, source {show_source}"}}}

    table = (*PANELS, Panel("seen", "Images seen", "Seen", images_seen, ("images",), row=4))
    assert outputs(table)[-3:] == ("seen", "results", "download")
    config = LabConfig(methods=("Source",), corruptions=("fog",), per_domain=16, batch_size=16)
    updates = list(lab_updates(config, True, StopToken(str(tmp_path / "stop")), str(tmp_path), table=table))
    drawn = [update[outputs(table).index("seen")]["layout"]["title"]["text"] for update in updates]
    assert drawn[-1] == "16 images, source True" and all(len(update) == len(outputs(table)) for update in updates)
