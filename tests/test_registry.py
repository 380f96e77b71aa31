"""A method is one file plus its line in the registry (issue 26): a toy method registered inside this test alone
appears in the sweep's grid, the Lab's menu, bench, reproduce and perf, with nothing else edited."""

import pytest
import torch

from imse.core.methods import METHODS
from imse.core.methods.tent import Tent


class Toy(Tent):
    """TENT under another name, with its own label, sweep check, menu variant and paper rule."""

    name = "toy"
    label = "Toy"
    sweep_checks = (("margin", (0.4, 0.6)),)
    menu_variants = {"Toy, wide margin": {"margin": 0.6}}

    @classmethod
    def paper_settings(cls, scenario: str) -> dict:
        return {"margin_classes": 1000}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)
    return Toy


@pytest.mark.slow  # a sweep, a Lab run, a bench run and perf's step of every method (~8 s on 2 cores)
def test_a_registered_method_appears_in_the_sweep_the_labs_menu_bench_reproduce_and_perf(toy, tmp_path, capsys):
    from imse.__main__ import main
    from imse.app.ui import method_labels
    from imse.core.methods import adaptive_methods
    from imse.perf.methods import bench_methods
    from imse.runs.bench import run_bench
    from imse.runs.lab import LabConfig, run_lab
    from imse.runs.protocol import method_overrides
    from imse.runs.sweep import run_sweep, sweep_checks

    assert "toy" in adaptive_methods() and sweep_checks()["toy"] == Toy.sweep_checks
    sweep = run_sweep(methods=("toy",), severities=(3,), per_domain=16, batch_size=8, factors=(1.0,), progress=False)
    assert [stage["setting"] for stage in sweep["methods"]["toy"]["stages"]] == ["lr", "margin"]
    assert sweep["methods"]["toy"]["default_lr"] == 1e-3 * 8 / 64  # TENT's rule, inherited: base_lr · B / 64

    assert {"Toy", "Toy, wide margin"} <= set(method_labels())
    config = LabConfig(methods=("Toy", "Toy, wide margin"), corruptions=("fog",), per_domain=16, batch_size=8)
    *_, state = run_lab(config, min_interval=0.0)
    assert set(state.summary) == {"Toy", "Toy, wide margin"}
    assert state.final_methods["Toy, wide margin"].hparams["margin"] == 0.6

    result = run_bench(methods=("toy",), corruptions=("fog",), per_domain=16, batch_size=8, progress=False,
                       collapse=False)  # fmt: skip
    assert result["per_seed"][0]["methods"]["toy"]["images"] == 16
    assert method_overrides("paper", "toy", "continual") == {"margin_classes": 1000}

    argv = ["reproduce", "--imagenet-c", str(tmp_path), "--methods", "toy", "--scenarios", "single", "--dry-run"]
    assert main(argv) == 0
    assert "| toy | single | the backbone's normalisation | – | – |" in capsys.readouterr().out

    timed = bench_methods(torch.device("cpu"), 4, 1, "builtin")
    assert "toy" in timed["step_s"] and timed["updated"]["toy"]
