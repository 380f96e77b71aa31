"""The suite's pieces, one ``add_<stage>`` per stage (``suite.STAGES``): what each runs and what it costs.

Each piece calls an existing benchmark with one cell of the suite's grid (model, batch, precision) and counts its
cost from the calls that benchmark makes (warm-up + repeats of each side) and the models it builds.
"""

from __future__ import annotations

from imse.perf.suite import Planner, Skip, architecture, lab_batches, shape_side
from imse.perf.suite_costs import FRESH_INTERPRETER_S, RUN_SETUP_S


def add_methods(p: Planner) -> None:
    """Every method's call at the suite's batch, per model and precision: the table a run's cost is read from."""
    from imse.core.methods import METHODS
    from imse.perf.methods import bench_methods

    s = p.sizes
    for model in s.method_models:
        for precision in s.precisions:
            calls = {(model, name, s.batch): 1 + s.method_repeats for name in METHODS}
            p.add("methods", "method_steps", f"every method's call, {model} b{s.batch} {precision}",
                  lambda _, m=model, pr=precision: bench_methods(p.device, s.batch, s.method_repeats, m, pr),
                  calls=calls, setup=p.setup(model), builds=len(METHODS))  # fmt: skip


def add_step(p: Planner) -> None:
    """IMSE vs SAR per model, batch and precision; batch 64 held to 1.35 (issue 37), smaller ones reported."""
    from imse.perf.steps import bench_step

    s = p.sizes
    for model in s.models:
        for batch in s.batches:
            for precision in s.precisions:
                held = batch == max(s.batches)
                p.add("step", "adaptation_step", f"IMSE vs SAR, {model} b{batch} {precision}",
                      lambda _, m=model, b=batch, pr=precision, h=held: bench_step(
                          p.device, b, s.repeats, m, pr, target=1.35, held=h),
                      calls={(model, "imse", batch): 1 + s.repeats, (model, "sar", batch): 1 + s.repeats},
                      setup=p.setup(model), builds=2)  # fmt: skip


def add_official(p: Planner) -> None:
    """Ours vs the official rebuild-every-forward layer in the same precision, and our bf16 step against the
    official fp32 one on the last model at the largest batch (issue 37: >= 4x on ViT-B/16 at batch 64)."""
    from imse.perf.steps import bench_small_batch

    s = p.sizes
    cells = [(m, b, pr, None, None) for m in s.models for b in s.official_batches for pr in s.precisions]
    if "bf16" in s.precisions:
        cells.append((s.models[-1], max(s.official_batches), "bf16", "fp32", 4.0))
    for model, batch, precision, reference, least in cells:
        sides = precision if reference is None else f"ours {precision} vs official {reference}"
        calls = {
            (model, "imse", batch): 1 + s.repeats,
            (model, "rebuild_step", batch): 1 + s.repeats,
            (model, "forward", batch): 2 + s.repeats,
            (model, "rebuild_forward", batch): 2 + s.repeats,
        }
        p.add("official", "official_step", f"rebuild-every-forward vs ours, {model} b{batch} {sides}",
              lambda _, m=model, b=batch, pr=precision, r=reference, least=least: bench_small_batch(
                  p.device, s.repeats, m, b, pr, reference_precision=r, least=least),
              calls=calls, setup=p.setup(model), builds=3)  # fmt: skip


def add_accuracy(p: Planner) -> None:
    """The accuracy per precision over the seeds (the built-in stream), then the precision a GPU run uses."""
    from imse.perf.accuracy import bench_accuracy, choose_precision
    from imse.runs.defaults import lab_settings
    from imse.runs.lab import method_name

    s = p.sizes
    stream = {"per_domain": 1000, "batch_size": 64, **s.accuracy_stream}
    domains = len(stream.get("corruptions", range(15)))
    batches = len(s.seeds) * domains * -(-stream["per_domain"] // stream["batch_size"])
    calls = {("builtin", m, stream["batch_size"]): len(s.precisions) * batches for m in s.accuracy_methods}
    corrupting = len(s.precisions) * batches * p.costs.corrupt(stream["batch_size"], shape_side("builtin"))
    corrupting += len(s.precisions) * len(s.seeds) * RUN_SETUP_S  # each seed builds its run
    p.add("accuracy", "precision_accuracy", f"accuracy per precision, {len(s.seeds)} seeds",
          lambda _: bench_accuracy(p.device, methods=s.accuracy_methods, precisions=s.precisions, seeds=s.seeds,
                                   stream=s.accuracy_stream),
          calls=calls, extra=corrupting, builds=len(s.precisions), many=False)  # fmt: skip
    lab_methods = tuple(method_name(label) for label in lab_settings()["methods"])
    p.add("accuracy", "precision_choice", f"GPU precision for {' + '.join(lab_methods)} on {s.choice_model}",
          lambda results: choose_precision(results["precision_accuracy"], results["method_steps"], s.choice_model,
                                           lab_methods),
          builds=0, many=False)  # fmt: skip


def add_lab(p: Planner) -> None:
    """The Lab's default run on the built-in backbone and on the hub one, in fp32 and in the chosen precision."""
    s = p.sizes
    for backbone in ("builtin", s.hub_backbone):
        model = architecture(backbone)
        images, batch = lab_batches(s, backbone)
        batches = -(-images // batch) + 1  # and the warm-up's one batch
        calls = {(model, "imse", batch): batches, (model, "source", batch): batches,
                 (model, "forward", batch): batches}  # the collapse meter's forward  # fmt: skip
        extra = batches * p.costs.corrupt(batch, shape_side(model))
        if backbone != "builtin":  # the stand-ins written, every image read from its JPEG, two builds from the hub
            extra += p.costs.load_images(2 * images + batch) + 2 * p.costs.prototype(model)
        compute = sum(n * p.costs.call(*what) for what, n in calls.items())
        extra += p.costs.lab_overhead(model, compute)
        for precision in ("fp32", "chosen"):
            p.add("lab", "lab_default", f"Lab default run, {backbone}, {precision}",
                  lambda results, b=backbone, pr=precision: lab_piece(p, results, b, pr),
                  calls=calls, setup=p.setup(model, injects=4), extra=extra, builds=4)  # fmt: skip


def lab_piece(p: Planner, results: dict, backbone: str, precision: str) -> dict:
    from imse.perf.lab_runs import bench_lab_default

    return bench_lab_default(p.device, backbone, resolved(results, precision), **p.sizes.lab_settings)


def resolved(results: dict, precision: str) -> str:
    """``precision``, or for ``"chosen"`` the one the accuracy stage chose; a piece that would repeat the fp32 run,
    or has no choice to run, is skipped."""
    if precision != "chosen":
        return precision
    choice = results.get("precision_choice")
    if not isinstance(choice, dict) or "chosen" not in choice:
        raise Skip("no precision was chosen (the accuracy stage did not finish)")
    if choice["chosen"] == "fp32":
        raise Skip("the chosen precision is fp32: the fp32 run is the chosen one")
    return choice["chosen"]


def add_merged(p: Planner) -> None:
    from imse.perf.steps import bench_merged_forward

    s = p.sizes
    for model in s.models:
        for precision in s.precisions:
            p.add("merged", "merged_forward", f"merged vs timm forward, {model} b{s.batch} {precision}",
                  lambda _, m=model, pr=precision: bench_merged_forward(p.device, s.batch, s.repeats, m, pr),
                  calls={(model, "forward", s.batch): 2 * (3 + s.repeats)}, setup=p.setup(model))  # fmt: skip


def add_stream(p: Planner) -> None:
    """Corrupting a batch vs the IMSE step it feeds (the built-in model on the CPU, ViT-B/16 on a GPU)."""
    from imse.data.corruptions import CORRUPTIONS
    from imse.perf.data import bench_stream

    s = p.sizes
    model = "builtin" if p.device.type == "cpu" else "vit_base_patch16_224"
    corrupting = len(CORRUPTIONS) * (1 + s.repeats) * p.costs.corrupt(s.batch, shape_side(model))
    p.add("stream", "stream", f"corruption vs IMSE step, {model} b{s.batch}",
          lambda _: bench_stream(p.device, s.repeats, s.batch),
          calls={(model, "imse", s.batch): 2 + s.repeats}, setup=p.setup(model), extra=corrupting,
          many=False)  # fmt: skip


def add_memory(p: Planner) -> None:
    from imse.perf.memory import bench_memory

    s = p.sizes
    model = s.models[-1]
    fresh = p.device.type != "cuda" if s.memory_fresh_process is None else s.memory_fresh_process
    for precision in s.memory_precisions or s.precisions:
        p.add("memory", "memory", f"peak memory of a step, {model} b{s.batch} {precision}",
              lambda _, pr=precision: bench_memory(p.device, s.batch, model, pr, s.memory_fresh_process),
              calls={(model, "imse", s.batch): 2, (model, "sar", s.batch): 2},
              setup=p.setup(model, injects=2), extra=2 * FRESH_INTERPRETER_S if fresh else 0.0, builds=3)  # fmt: skip


def add_tests(p: Planner) -> None:
    """The CUDA tests, for the time left (no estimate of their own: they take what remains)."""
    from imse.perf.cuda_tests import cuda_test_arguments, run_tests, tests_folder

    s = p.sizes

    def run(results: dict, seconds: float, log):
        folder = tests_folder()
        if s.test_arguments is None and folder is None:
            raise FileNotFoundError("no tests folder beside the package (an installed package): run from a checkout")
        arguments = list(s.test_arguments) if s.test_arguments is not None else cuda_test_arguments(folder)
        return run_tests(arguments, seconds=seconds, log=log, cwd=folder.parent if folder else None)

    p.add("tests", "cuda_tests", "CUDA tests", run, builds=0, many=False)
