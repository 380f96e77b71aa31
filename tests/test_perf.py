"""The step floor of ``python -m imse perf``: its multiply-add count equals a hand count for a whole ViT."""

import pytest
import timm

from imse.perf import step_floor


def hand_count(d: int, depth: int, batch: int, classes: int = 1000, frozen: int = 3) -> tuple[int, int]:
    """SAR and IMSE GEMM multiply-adds of one step (two SAM passes), written out for a ViT with width d and
    MLP 4d at 224 px / patch 16 (T = 197 tokens per image), from the shapes written out here."""
    T = 197 * batch
    patch = 196 * batch * 768 * d  # the patch embedding: 3·16·16 inputs per output
    head = 2 * batch * d * classes  # forward + input gradient
    attention = 6 * 197**2 * d * batch
    sar_block = 2 * T * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + attention

    def trained(out, inp, input_grad=True):
        r = min(out, inp)
        factored = 2 * T * r * (inp + out) - (0 if input_grad else T * r * inp)
        dense = 3 * T * out * inp + 2 * out * r * inp - (0 if input_grad else T * out * inp)
        return min(factored, dense)

    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # qkv, proj, fc1, fc2 as (out, in)
    imse = 0
    for block in range(depth):
        if block >= depth - frozen:  # frozen S, x Vhᵀ still needed: the factored route
            imse += sum(2 * T * min(o, i) * (i + o) for o, i in shapes) + attention
        else:
            imse += sum(trained(o, i, input_grad=(block, n) != (0, 0)) for n, (o, i) in enumerate(shapes))
            imse += attention
    sar = 2 * (patch + head + depth * sar_block)
    return sar, 2 * (patch + head + imse)


@pytest.mark.parametrize("name,d,depth", [("vit_tiny_patch16_224", 192, 12), ("vit_small_patch16_224", 384, 12)])
def test_step_floor_equals_a_hand_count(name, d, depth):
    model = timm.create_model(name, pretrained=False)
    floor = step_floor(model, batch=64)
    sar, imse = hand_count(d, depth, 64)
    assert (floor["sar_macs"], floor["imse_macs"]) == (sar, imse)
    # at batch 64 the square proj layers of the trained blocks take the dense route: the floor is below the
    # all-factored count
    assert floor["ratio"] < (imse + 2 * 9 * 197 * 64 * d * d) / sar


def test_a_benchmark_result_carries_its_rows_and_the_table_is_rendered_from_them():
    """The merged-forward benchmark on a tiny ViT: its result says what it was held to and whether it met it,
    and the table shows exactly those rows (a target missed reads NO)."""
    import torch

    from imse.perf import checks_of, format_table
    from imse.perf.steps import bench_merged_forward

    result = bench_merged_forward(torch.device("cpu"), 2, 1, "vit_tiny_patch16_224")
    (row,) = result["checks"]
    assert row["target"] == f"<= {result['target']}" and row["ratio"] == f"{result['ratio']:.3f}"
    assert row["met"] is (result["ratio"] <= result["target"])
    results = {"device": "cpu", "device_name": "test", "threads": 1, "merged_forward": result}
    assert checks_of(results) == [row]
    missed = {**results, "merged_forward": {**result, "checks": [{**row, "met": False}]}}
    lines = format_table(missed).splitlines()
    assert len(lines) == 4 and row["measure"] in lines[3] and lines[3].rstrip(" |").endswith("NO")
    assert [cell.strip() for cell in lines[1].split("|")[1:-1]] == ["measure", "median", "ratio", "target", "met"]


class Clock:
    """A stand-in for ``time`` in ``imse.perf.timing``: the k-th timed call lasts k seconds."""

    def __init__(self) -> None:
        self.now, self.reads = 0.0, 0

    def perf_counter(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # a call's end: read twice per call, start and end
            self.now += self.reads // 2
        return self.now


def test_the_methods_benchmark_times_every_step_against_imses_and_counts_what_each_adapts(monkeypatch):
    """On the built-in model at batch 4: every adaptive method took full updates and Source's forward none, each
    ratio is its call over IMSE's (on a clock where the methods' calls, timed in the registry's order, last 1, 2,
    3 … s), and the counts equal hand counts from the model's shapes (IMSE: S of blocks 0 … depth-4; ViDA's
    adapters: rank 1 + rank 128 bottlenecks beside every qkv and proj)."""
    import torch

    from imse.core.methods import METHODS, adaptive_methods
    from imse.perf import timing
    from imse.perf.methods import bench_methods

    monkeypatch.setattr(timing, "time", Clock())
    result = bench_methods(torch.device("cpu"), 4, 1, "builtin")
    order = tuple(METHODS)  # timed in this order, once each: 1 s, 2 s, 3 s … on the clock
    assert list(result["step_s"]) == list(order) and result["precision"] == "fp32"
    assert all(result["updated"][name] for name in adaptive_methods()) and result["updated"]["source"] is False
    assert result["step_s"] == {name: float(k) for k, name in enumerate(order, start=1)}
    imse = order.index("imse") + 1  # IMSE's step, in seconds
    ratios = {name: k / imse for k, name in enumerate(order, start=1)}
    assert result["step_ratio_to_imse"] == pytest.approx(ratios, rel=1e-15)
    others = [(k, name) for k, name in enumerate(order, start=1) if name != "imse"]
    assert [(row["median"], row["ratio"]) for row in result["checks"][: len(others)]] == [
        (f"{k}000.0 / {imse}000.0 ms", f"{k / imse:.2f}") for k, _ in others
    ]
    if order == ("source", "tent", "sar", "imse", "vida", "dpal"):  # the registry today: the same by hand
        assert [row["ratio"] for row in result["checks"][:5]] == ["0.25", "0.50", "0.75", "1.25", "1.50"]
    from imse.data.models import BUILTIN, create_backbone

    vit = create_backbone(BUILTIN).model
    d, depth = vit.embed_dim, len(vit.blocks)
    assert result["trainable"]["imse"] == (depth - 3) * 4 * d  # qkv, proj, fc1, fc2: min(out, in) = d each
    qkv, proj = (1 + 128) * (d + 3 * d), (1 + 128) * (d + d)
    assert result["vida_adapter_values"] == depth * (qkv + proj)
    assert result["trainable"]["source"] == 0
    assert [row["measure"].split(" ")[0] for row in result["checks"][:5]] == ["source", "tent", "sar", "vida", "dpal"]


def test_the_unavoidable_compute_times_each_method_once_per_batch_of_the_config_on_the_labs_batches():
    """perf --only lab's denominator: every method called once on every batch of the config's stream (here 2
    domains of 100 images in batches of 32: 32, 32, 32, 4 each), doing what the Lab's run does on those batches
    (the same correct counts, batch by batch), and /start's arguments carry exactly that config."""
    from imse.app.ui import START_INPUTS
    from imse.perf.app import start_arguments, unavoidable_compute
    from imse.runs.lab import LabConfig, run_lab

    config = LabConfig(corruptions=("fog", "contrast"), per_domain=100, batch_size=32, severity=3)
    result = unavoidable_compute(config)
    assert (result["batches"], result["images"]) == (8, 200)
    assert [len(correct) for correct in result["batch_correct"].values()] == [8, 8]
    assert result["seconds"] == sum(result["method_seconds"].values()) > 0
    *_, state = run_lab(config, min_interval=0.0)
    lab = {label: [r["methods"][label]["correct"] for r in state.records] for label in state.methods}
    assert result["batch_correct"] == lab
    arguments = start_arguments(config)
    assert list(arguments) == list(START_INPUTS)  # every input /start takes, by name
    assert arguments["corruptions"] == ["fog", "contrast"] and arguments["per_domain"] == 100
    assert arguments["batch_size"] == 32 and arguments["methods"] == ["IMSE", "Source"]
    assert arguments["show_source"] is False and arguments["device"] == "cpu"
