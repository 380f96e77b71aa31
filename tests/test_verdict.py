"""The sentence a finished Lab run ends with, word for word, from hand-made results."""

import pytest

from imse.app.lab_results import verdict
from imse.runs.lab import LabState


def finished(means: dict[str, float], *, batch=157, total=157, images=10_000, banks=None) -> LabState:
    """A finished run's state as the results table reads it: each method's mean accuracy (and a bank's record)."""
    summary = {label: {"mean_accuracy": mean, "domains": []} for label, mean in means.items()}
    for label, bank in (banks or {}).items():
        summary[label]["bank"] = bank
    return LabState(config={}, methods=list(means), class_names=["a", "b"], batch=batch, total_batches=total,
                    images=images, finished=True, summary=summary)  # fmt: skip


def bank(detections, boundaries, found, could=0, same=0) -> dict:
    return {"detections": detections, "boundaries": boundaries, "boundaries_detected": found,
            "retrievals_with_own_code_stored": could, "retrieved_same_corruption": same,
            "retrieved_other_corruption": could - same, "retrieved_source": 0}  # fmt: skip


def test_one_method_alone():
    assert verdict(finished({"IMSE": 0.7149})) == "IMSE reached 71.5 % over 10,000 images."
    assert verdict(finished({"Source": 0.6841}, images=2_560)) == "Source reached 68.4 % over 2,560 images."


def test_one_method_against_source_with_its_bank():
    state = finished(
        {"IMSE + retrieval (top-1)": 0.7153, "Source": 0.6841}, banks={"IMSE + retrieval (top-1)": bank(3, 3, 3)}
    )
    assert verdict(state) == (
        "IMSE + retrieval (top-1) ended 3.1 points above Source (71.5 % vs 68.4 %) over 10,000 images; "
        "the bank stored 3 domains (it caught 3 of 3 changes)."
    )


def test_several_methods_name_the_best_against_source():
    state = finished({"IMSE": 0.7153, "TENT": 0.7010, "SAR": 0.6602, "Source": 0.6841})
    assert verdict(state) == (
        "IMSE did best of 3 adapting methods, 3.1 points above Source (71.5 % vs 68.4 %) over 10,000 images."
    )
    below = finished({"TENT": 0.6720, "SAR": 0.6602, "Source": 0.6841})
    assert verdict(below) == (
        "TENT did best of 2 adapting methods, 1.2 points below Source (67.2 % vs 68.4 %) over 10,000 images."
    )
    tied = finished({"IMSE": 0.7153, "TENT": 0.7149, "Source": 0.6841})
    assert verdict(tied) == (
        "IMSE and TENT tied for best of 2 adapting methods, 3.1 points above Source (71.5 % vs 68.4 %) "
        "over 10,000 images."
    )


def test_a_level_run_says_so():
    assert verdict(finished({"IMSE": 0.6843, "Source": 0.6841})) == (
        "IMSE ended level with Source (68.4 % each) over 10,000 images."
    )


def test_a_run_cut_short_by_the_time_limit_says_where():
    state = finished({"IMSE": 0.7040, "Source": 0.6841}, batch=50, images=3_200)
    assert verdict(state) == (
        "Cut short by the time limit after 50 of 157 batches (3,200 images): "
        "IMSE ended 2.0 points above Source (70.4 % vs 68.4 %)."
    )


def test_without_source_the_best_is_measured_against_the_runner_up():
    assert verdict(finished({"TENT": 0.7010, "IMSE": 0.7153, "SAR": 0.6602})) == (
        "IMSE did best of 3 methods, 1.4 points above TENT (71.5 % vs 70.1 %) over 10,000 images."
    )
    assert verdict(finished({"IMSE": 0.7012, "TENT": 0.7010})) == "IMSE and TENT tied at 70.1 % over 10,000 images."


def test_a_recurring_run_says_what_the_bank_brought_back():
    state = finished(
        {"IMSE + retrieval (top-1)": 0.7153, "Source": 0.6841},
        banks={"IMSE + retrieval (top-1)": bank(5, 5, 4, could=3, same=2)},
    )
    assert verdict(state).endswith(
        "; the bank stored 5 domains (it caught 4 of 5 changes) and brought back the same corruption's code 2 of 3 "
        "times."
    )
    single = finished({"IMSE + retrieval (mix)": 0.7153}, banks={"IMSE + retrieval (mix)": bank(1, 0, 0)})
    assert verdict(single) == "IMSE + retrieval (mix) reached 71.5 % over 10,000 images; the bank stored 1 domain."


def test_an_unfinished_run_has_no_verdict():
    state = finished({"IMSE": 0.7})
    state.finished, state.summary = False, None
    with pytest.raises(ValueError, match="not finished"):
        verdict(state)
