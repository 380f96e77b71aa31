import json
import subprocess
import sys

import pytest
from test_perf import Clock  # the stand-in clock: the k-th timed call lasts k s

from imse.__main__ import main


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "imse", "--help"], capture_output=True, text=True, check=True)
    assert "perf" in result.stdout


@pytest.mark.slow  # ViT-B/16 forwards
def test_perf_writes_ratios(tmp_path, capsys, monkeypatch):
    from imse.perf import timing

    monkeypatch.setattr(timing, "time", Clock())
    out = tmp_path / "perf.json"
    assert main(["perf", "--only", "merged", "--repeats", "1", "--batch", "1", "--out", str(out)]) == 0
    merged = json.loads(out.read_text())["merged_forward"]
    # timed once each, the timm forward first (1 s), then the merged one (2 s)
    assert (merged["plain_forward_s"], merged["merged_forward_s"], merged["ratio"]) == (1.0, 2.0, 2.0)
    assert merged["checks"][0]["ratio"] == "2.000" and merged["checks"][0]["met"] is False  # the target is 1.02
    assert "merged IMSE fwd / timm fwd" in capsys.readouterr().out


def test_perf_rejects_unknown_measure(capsys):
    with pytest.raises(SystemExit):
        main(["perf", "--only", "speed"])
    assert "unknown measure" in capsys.readouterr().err


@pytest.mark.slow  # ViT-Tiny steps and two bench runs
def test_perf_precision_times_bf16_and_measures_its_accuracy_cost(tmp_path, capsys, monkeypatch):
    from imse.perf import timing
    from imse.runs.bench import run_bench

    monkeypatch.setattr(timing, "time", Clock())
    out = tmp_path / "perf.json"
    argv = ["perf", "--only", "precision", "--models", "vit_tiny_patch16_224", "--batch", "2", "--repeats", "1"]
    assert main([*argv, "--per-domain", "16", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["precision"]
    assert (r["model"], r["batch"], r["all_updated"]) == ("vit_tiny_patch16_224", 2, True)
    # timed once each, in this order: IMSE bf16 (1 s), SAR bf16 (2 s), IMSE fp32 (3 s)
    assert (r["imse_bf16_step_s"], r["sar_bf16_step_s"], r["imse_fp32_step_s"]) == (1.0, 2.0, 3.0)
    assert (r["ratio"], r["imse_bf16_images_per_s"], r["bf16_speedup"]) == (0.5, 2.0, 3.0)  # 1/2, batch 2 in 1 s, 3/1
    accuracy = r["accuracy"]
    assert accuracy["images"] == 15 * 16
    # the fp32 side is exactly what `python -m imse bench` reports for IMSE on the same stream
    alone = run_bench(methods=("imse",), per_domain=16, progress=False)["methods"]["imse"]["mean_accuracy"]
    assert accuracy["fp32_mean"] == alone
    assert accuracy["difference_points"] == pytest.approx(100 * (accuracy["bf16_mean"] - alone))
    assert "IMSE accuracy bf16 - fp32" in capsys.readouterr().out


def test_perf_runs_every_benchmark_unless_told_otherwise(monkeypatch):
    import imse.perf
    from imse.perf import ALL_BENCHMARKS

    asked = []
    monkeypatch.setattr(imse.perf, "run_perf", lambda **kwargs: asked.append(kwargs["only"]))
    assert main(["perf"]) == 0 and main(["perf", "--only", "step, small"]) == 0
    assert asked == [ALL_BENCHMARKS, ("step", "small")]


def test_the_allocator_is_left_alone_until_a_command_computes(monkeypatch, capsys):
    from imse.runs import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        main(["--help"])
    with pytest.raises(SystemExit):
        main(["bench", "--per-domain", "0"])  # a usage error
    assert main([]) == 0 and calls == []
    assert main(["bench", "--data", "/no/such/folder", "--backbone", "vit_tiny_patch16_224"]) == 2
    assert calls == [1]


def test_debug_adds_the_traceback_to_a_one_line_error(capsys):
    arguments = ["bench", "--data", "/no/such/folder", "--backbone", "vit_tiny_patch16_224"]
    assert main(arguments) == 2
    plain = capsys.readouterr().err
    assert plain.strip().startswith("error:") and "Traceback" not in plain and plain.count("\n") == 1
    assert main(["--debug", *arguments]) == 2
    debug = capsys.readouterr().err
    assert "Traceback (most recent call last)" in debug and debug.strip().endswith(plain.strip())


def test_reproduce_dry_run_prints_each_methods_preprocessing_checkpoint_and_retrieval(tmp_path, capsys):
    from imse.__main__ import main

    argv = ["reproduce", "--imagenet-c", str(tmp_path), "--methods", "imse,vida", "--scenarios", "single,continual",
            "--seeds", "0,1", "--out", str(tmp_path / "r.json"), "--dry-run"]  # fmt: skip
    assert main(argv) == 2  # ViDA without its warm-up would be refused
    text = capsys.readouterr().out
    assert text.startswith("8 runs under --protocol paper") and "supervised/imagenet-c/continual/vida/1" in text
    assert "| imse | single | the backbone's normalisation | – | none |" in text
    assert "| imse | continual | the backbone's normalisation | – | top1 |" in text
    assert "| vida | continual | [0, 1] images, no normalisation | required, missing | – |" in text
    assert "refused: vida needs checkpoint under --protocol paper" in text
    warm = tmp_path / "vida.pt"
    warm.write_bytes(b"")
    assert main([*argv, "--checkpoint", f"vida={warm}"]) == 0
    assert f"| vida | single | [0, 1] images, no normalisation | {warm} | – |" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("backbone", "data"),
    [
        ("builtin", "builtin"),
        ("vit_small_patch16_224.augreg_in21k_ft_in1k", "imagenette"),
        ("deit_tiny_patch16_224", "imagenette"),
    ],
)
def test_bench_reads_the_backbones_own_data_when_no_data_is_given(monkeypatch, backbone, data):
    """Without --data, bench streams the data the backbone's card names (a timm name without a card: ImageNet's
    classes, so Imagenette). Stand-in: run_bench itself, which would load weights and data; the call is what is read."""
    import imse.runs.bench

    calls = []

    def run_bench(**settings):
        calls.append(settings)
        raise RuntimeError("stop here")  # the command prints it as its one-line error

    monkeypatch.setattr(imse.runs.bench, "run_bench", run_bench)
    assert main(["bench", "--backbone", backbone, "--methods", "source"]) == 2  # the error exit
    assert calls[0]["data"] == data
