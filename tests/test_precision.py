"""The ``precision`` setting (fp32 | tf32 | bf16) of every method, and its way through the runner, bench, reproduce,
the CLI and the Lab (issue 27, item 1). CPU-fast; the CUDA variant is skipped without a GPU."""

import json

import pytest
import torch
from conftest import CUDA, tiny_vit

from imse.app import ui  # gradio: imported when the tests are collected, as tests/test_app.py does
from imse.core.losses import alignment_std, diversity_loss, layer_diversity, masked_mean, softmax_entropy
from imse.core.methods import METHODS, create
from imse.core.methods.base import PRECISIONS, precision_scope
from imse.core.methods.dpal import prompt_similarity_loss

# DPAL's recovery fires on every step of a model this confident (see test_methods.NO_RECOVERY)
SETTINGS = {"dpal": {"reset_threshold": 0.0}, "vida": {"augmentations": 2}}


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def make(name: str, device: str = "cpu", **settings):
    margin = {"margin": 1.0} if "margin" in METHODS[name].defaults else {}  # every sample reliable: an update
    return create(name, tiny_vit(head_scale=20.0).to(device), **margin, **SETTINGS.get(name, {}), **settings)


def two_steps(method, device: str = "cpu"):
    """Logits of two steps, the adapted values after them (and ViDA's teacher), and what a step saw of the TF32
    flags (through the method's own ``step``)."""
    seen = []
    step = method.step

    def watched(x):
        seen.append(tf32_flags())
        return step(x)

    method.step = watched
    initial = {name: p.detach().clone() for name, p in method.trainable.items()}  # as created
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32, device=device)
    logits = [method(x), method(x)]
    state = {name: p.detach().clone() for name, p in method.trainable.items()}
    moved = any(not torch.equal(state[name], initial[name]) for name in state)
    if hasattr(method, "teacher"):
        state.update({f"teacher.{k}": v.clone() for k, v in method.teacher.state_dict().items()})
    return logits, state, seen, moved


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp32_is_the_default_and_tf32_on_the_cpu_is_fp32_bit_for_bit(name):
    """The default, precision="fp32" and, on the CPU (no TF32 there), "tf32" give the same bits: logits, adapted
    values, ViDA's teacher; a tf32 step on the CPU leaves the global TF32 flags as they were, during and after."""
    before = tf32_flags()
    runs = {p: two_steps(make(name) if p is None else make(name, precision=p)) for p in (None, "fp32", "tf32")}
    reference_logits, reference_state, _, moved = runs[None]
    assert moved == (name != "source")  # the steps did adapt: the equality below is not a vacuous one
    for precision in ("fp32", "tf32"):
        logits, state, seen, _ = runs[precision]
        assert all(torch.equal(a, b) for a, b in zip(logits, reference_logits, strict=True)), precision
        assert state.keys() == reference_state.keys()
        assert all(torch.equal(state[k], reference_state[k]) for k in state), precision
        assert seen == [before, before]
    assert tf32_flags() == before


def test_the_tf32_scope_sets_both_flags_on_cuda_and_restores_them_however_the_step_ends():
    """``precision_scope`` sets the (global, device-less) flags for a CUDA batch and puts back what they were, on
    an exception too; fp32 and bf16 leave them alone, and so does a CPU batch."""
    saved = tf32_flags()
    try:
        for initial in ((False, False), (True, False), (False, True)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = initial
            with precision_scope("tf32", "cuda"):
                assert tf32_flags() == (True, True)
            assert tf32_flags() == initial
            with pytest.raises(RuntimeError, match="boom"), precision_scope("tf32", torch.device("cuda", 0)):
                raise RuntimeError("boom")
            assert tf32_flags() == initial
            for precision, device in (("fp32", "cuda"), ("bf16", "cuda"), ("tf32", "cpu")):
                with precision_scope(precision, device):
                    assert tf32_flags() == initial
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("name", ["imse", "vida"])
def test_tf32_sets_the_flags_for_the_whole_step_on_cuda_and_restores_them(name, device):
    saved = tf32_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        logits, _, seen, _ = two_steps(make(name, device, precision="tf32"), device)
        assert seen == [(True, True), (True, True)] and tf32_flags() == (False, False)
        assert all(torch.isfinite(x).all() for x in logits)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_losses_reduce_in_float32_under_bf16_autocast_and_keep_fp32_bits():
    torch.manual_seed(0)
    logits, values = torch.randn(16, 10), torch.rand(16)
    mask = values > 0.3
    x, vh = torch.randn(4, 9, 32), torch.linalg.qr(torch.randn(32, 8))[0].T
    std = torch.rand(8)
    noises = [torch.randn(6, 32) for _ in range(3)]
    fp32 = [softmax_entropy(logits), masked_mean(values, mask), layer_diversity(std), alignment_std(x, vh),
            prompt_similarity_loss(noises)]  # fmt: skip
    # a float32 tensor's .float() is itself: the same bits as the expressions before it was added
    assert torch.equal(fp32[0], -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
    assert torch.equal(fp32[1], values[mask].mean())
    assert torch.equal(fp32[2], torch.topk(std, 7, largest=False, sorted=False).values.mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = [softmax_entropy(logits.bfloat16()), masked_mean(values.bfloat16(), mask),
                layer_diversity(std.bfloat16()), alignment_std(x.bfloat16(), vh),
                prompt_similarity_loss([n.bfloat16() for n in noises])]  # fmt: skip
        assert diversity_loss([std.bfloat16(), std.bfloat16()]).dtype == torch.float32
    assert [value.dtype for value in bf16] == [torch.float32] * 5
    for a, b in zip(bf16, fp32, strict=True):
        assert torch.allclose(a, b, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("name", ["imse", "dpal"])
def test_a_bf16_step_keeps_its_loss_adapted_values_and_optimiser_state_in_float32(name):
    """Under bf16 the loss that is back-propagated is float32 (IMSE's with its diversity term, DPAL's with its
    similarity term), and so are the adapted values (IMSE's S) and the optimiser's state."""
    method = make(name, precision="bf16")
    losses = []
    backward = torch.Tensor.backward

    def recorded(tensor, *args, **kwargs):
        losses.append(tensor.dtype)
        return backward(tensor, *args, **kwargs)

    torch.Tensor.backward = recorded
    try:
        method(torch.rand(8, 3, 32, 32))
    finally:
        torch.Tensor.backward = backward
    assert method.last_record["updated"] and losses == [torch.float32, torch.float32]
    assert all(p.dtype == torch.float32 for p in method.trainable.values())
    base = method.optimizer.base_optimizer
    states = [t for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim]
    assert states and all(t.dtype == torch.float32 for t in states)


@pytest.mark.slow  # IMSE through 48 images twice, with the built-in model's first SVD (~3 s on 2 cores)
def test_bf16_accuracy_on_the_builtin_model_is_that_of_fp32():
    """The built-in model, IMSE on 48 gaussian-noise-5 images (3 batches), bf16 against fp32 on the CPU: the same
    correct count within one image and at most one prediction in 48 changed (measured here: 36 correct in each,
    no prediction changed; a longer stream: docs/performance.md, "Precision")."""
    from imse.data.builders import build_source
    from imse.data.models import BUILTIN, create_backbone
    from imse.data.streams import Stream
    from imse.runs.runner import build_methods, run

    base = create_backbone(BUILTIN)
    source = build_source("builtin", BUILTIN, base.input_size)
    correct, predictions = {}, {}
    for precision in ("fp32", "bf16"):
        methods = build_methods(base, BUILTIN, {"imse": ("imse", {})}, batch_size=16, precision=precision)
        assert methods["imse"].hparams["precision"] == precision
        stream = Stream(source, scenario="continual", corruptions=("gaussian_noise",), severity=5, per_domain=48,
                        batch_size=16, seed=0)  # fmt: skip
        records = list(run(methods, stream))
        correct[precision] = sum(r["methods"]["imse"]["correct"] for r in records)
        predictions[precision] = [p for r in records for p in r["methods"]["imse"]["predictions"]]
    changed = sum(a != b for a, b in zip(predictions["bf16"], predictions["fp32"], strict=True))
    assert abs(correct["bf16"] - correct["fp32"]) <= 1 and changed <= 1, (correct, changed)


def test_bench_precision_flag_reaches_every_methods_settings_in_the_json(tmp_path, capsys):
    from imse.__main__ import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "source,tent", "--corruptions", "fog", "--per-domain", "8", "--batch-size", "8"]
    assert main([*argv, "--precision", "bf16", "--out", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert config["precision"] == "bf16"
    assert {spec: s["precision"] for spec, s in config["settings"].items()} == {"source": "bf16", "tent": "bf16"}
    with pytest.raises(SystemExit):
        main([*argv, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_bench_refuses_an_unknown_precision_before_loading_anything(monkeypatch):
    from imse.runs import bench

    monkeypatch.setattr(bench, "create_backbone", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'fp16'"):
        bench.run_bench(precision="fp16")


def test_reproduce_precision_flag_reaches_every_run(monkeypatch, tmp_path):
    from imse.__main__ import main
    from imse.runs import reproduce

    calls, original = [], reproduce.reproduce
    monkeypatch.setattr(reproduce, "reproduce", lambda **kwargs: calls.append(kwargs) or {"runs": {}})
    argv = ["reproduce", "--imagenet-c", str(tmp_path), "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0 and main([*argv, "--precision", "tf32"]) == 0
    assert [call["precision"] for call in calls] == ["fp32", "tf32"]
    # and reproduce hands it to each run
    for precision in ("bf16", None):  # None: left out, reproduce's default
        jobs = []
        given = {} if precision is None else {"precision": precision}
        out = tmp_path / f"{precision}.json"  # a fresh file each time: an existing one is resumed, no job runs
        result = original(roots={"imagenet-c": str(tmp_path)}, out=out, progress=False, methods=("imse",),
                          run_job=lambda job, **kwargs: jobs.append(kwargs) or {"job": job.key}, **given)  # fmt: skip
        assert len(jobs) == len(result["runs"]) > 0
        assert [kwargs["precision"] for kwargs in jobs] == [precision or "fp32"] * len(jobs)


def test_lab_config_takes_a_precision_and_refuses_an_unknown_one_readably():
    import gradio as gr

    from imse.runs.lab_config import LabConfig, validate

    assert LabConfig().precision == "fp32" and PRECISIONS == ("fp32", "tf32", "bf16")
    for precision in PRECISIONS:
        assert validate(LabConfig(precision=precision)).precision == precision
    for bad in ("fp16", "FP32", None, 16):
        with pytest.raises(ValueError, match=r"^precision must be one of fp32, tf32, bf16, got "):
            validate(LabConfig(precision=bad))
    settings = dict(zip(ui.SETTINGS, ui.settings_values(), strict=True))
    assert ui.make_config(**settings, device="cpu").precision == "fp32"  # a caller that does not send it
    assert ui.make_config(**settings, device="cpu", precision="bf16").precision == "bf16"
    with pytest.raises(gr.Error, match="precision must be one of"):
        ui.make_config(**settings, device="cpu", precision="half")


def test_start_takes_precision_last_with_a_default_so_older_clients_still_call_it():
    # precision came after show_source, then the visitor's own images (their upload, how it streams, its labels)
    assert ui.START_INPUTS[-5:] == ("show_source", "precision", "upload", "upload_streams", "upload_labels")
    assert ui.make_config().precision == "fp32"  # left out: the default run's
    assert [value for _, value in ui.precision_choices()] == list(PRECISIONS)


def test_the_served_start_fills_in_fp32_for_a_client_that_sends_the_older_arguments(monkeypatch):
    """gradio_client fills a parameter left out from the API's default (the Precision dropdown's value). Builds
    the app's Blocks (about a second once gradio is imported), serves nothing."""
    from pathlib import Path

    from gradio_client.utils import construct_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    app = __import__("app")  # the repository's app.py: builds the Blocks, serves nothing

    parameters = app.demo.get_api_info()["named_endpoints"]["/start"]["parameters"]
    published = ["backbone", "scenario", "corruptions", "severity", "methods", "batch_size", "per_domain", "seed",
                 "imse_lr", "lambda_dm", "tau", "rounds", "device", "show_source", "precision", "upload",
                 "upload_streams", "upload_labels"]  # fmt: skip
    assert [p["parameter_name"] for p in parameters] == published  # what existing clients call it by
    older = tuple(range(published.index("precision")))
    # an older client's arguments: fp32, no upload (the backbone's own data), the upload settings' defaults
    assert construct_args(parameters, older, {}) == [*older, "fp32", None, "as-is", "folders"]


def test_the_lab_run_builds_its_methods_in_the_configs_precision():
    from imse.runs.lab import build_run
    from imse.runs.lab_config import LabConfig

    run = build_run(LabConfig(corruptions=("fog",), per_domain=64, methods=("IMSE", "Source"), precision="bf16"))
    assert {label: m.hparams["precision"] for label, m in run.methods.items()} == {"IMSE": "bf16", "Source": "bf16"}
