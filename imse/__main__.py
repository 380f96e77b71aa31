"""Command line: ``python -m imse <command>``; ``python -m imse --help`` lists the commands."""

from __future__ import annotations

import argparse
import sys
import traceback

from imse.commands import (
    bench_command,
    perf_command,
    reproduce_command,
    shifts_command,
    soak_command,
    sweep_command,
    train_builtin_command,
    vida_warmup_command,
)


def _add_vida_warmup(commands) -> None:
    from imse.runs.vida_warmup import WARMUP_DEFAULTS

    warm = commands.add_parser(
        "vida-warmup",
        help="train ViDA's adapters on clean source images: the checkpoint its official run starts from",
        description="Injects ViDA's adapters into --backbone, trains only them (the ViT frozen) with cross-entropy "
        "on the source training split (built-in model: Fashion-MNIST's train split; a timm ViT: --data, your "
        "ImageNet train folder) and writes them as safetensors for --checkpoint vida=FILE.",
    )
    warm.add_argument("--backbone", default="builtin", help="'builtin' or a timm name with its weight tag")
    warm.add_argument("--weights", help="local weights file for --backbone")
    warm.add_argument("--data", help="source training images, <class>/<images> (required for a timm ViT)")
    warm.add_argument("--preprocessing", choices=("backbone", "unit"), default="backbone",
                      help="what the ViT is fed, as the runs that load it: 'backbone' (its normalisation; the lab "
                      "protocol) or 'unit' ([0, 1] as they are; the paper protocol, as the official ViDA "
                      "run)")  # fmt: skip
    for name in ("steps", "batch_size", "lr", "seed"):
        default = WARMUP_DEFAULTS[name]
        warm.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                          help="(default: %(default)s)")  # fmt: skip
    warm.add_argument("--device", default="cpu")
    warm.add_argument("--out", required=True, help="the checkpoint to write (.safetensors)")
    warm.set_defaults(handler=vida_warmup_command)


def _add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=("fp32", "tf32", "bf16"),
        default="fp32",
        help="every method's arithmetic: fp32; tf32 (TF32 matmuls on CUDA for the whole step; on the CPU the same "
        "as fp32); bf16 (forwards under bfloat16 autocast; the adapted values, optimiser and losses stay float32) "
        "(default: %(default)s)",
    )


def _add_model_args(parser: argparse.ArgumentParser, severity: int | None = 5, batch_size: int | None = 64) -> None:
    parser.add_argument("--backbone", default="builtin",
                        help="'builtin' or any timm ViT tag (a timm name with its weight tag, e.g. "
                        "deit_tiny_patch16_224.fb_in1k)")  # fmt: skip
    parser.add_argument("--weights", help="local weights file (safetensors or .pth state dict) for --backbone")
    parser.add_argument(
        "--data",
        help="'builtin', 'imagenette', your own images (a folder or .zip: images; CLASS/images; DOMAIN/images; "
        "DOMAIN/CLASS/images; class folders named after the model's classes), or imagenet-c:<root> (bench only); "
        "default: the backbone's own (its card's: builtin for the built-in model, imagenette for an ImageNet ViT)",
    )
    parser.add_argument("--severity", type=int, default=severity, choices=range(1, 6))
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="cpu")


def _add_perf(commands) -> None:
    perf = commands.add_parser(
        "perf",
        help="speed and memory benchmarks (medians, ratios against a baseline timed in the same run)",
        description="Each line is a ratio against a baseline timed in the same run: IMSE vs SAR step with its "
        "GEMM floor (ViT-S/16, ViT-B/16, random init), the per-call path vs rebuilding U diag(S) Vh on every "
        "forward (batch 1 and --batch), bf16 autocast (speed, and accuracy vs fp32), merged-IMSE vs timm "
        "inference, SVD start-up with the disk cache, memory, "
        "corruption vs the step it feeds, the app's live run and its figures, and the app's cold start.",
    )
    perf.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    perf.add_argument(
        "--suite",
        action="store_true",
        help="every GPU number in one run (issue 37): each method's step per backbone and precision, IMSE vs SAR "
        "and vs the official layer in fp32/tf32/bf16, the accuracy per precision over 3 seeds and the precision "
        "it chooses, the Lab's default runs, merged inference, corruption vs step, peak memory, then the CUDA "
        "tests for the time left; prints its plan and estimate first, writes --out (JSON) and a .md table beside "
        "it after every piece (docs/performance.md says how a GPU session runs it)",
    )
    perf.add_argument(
        "--smoke",
        action="store_true",
        help="the suite at tiny sizes (stand-in ViTs at 32 px, a few images): every code path in about a minute "
        "on a CPU, numbers not worth reporting",
    )
    perf.add_argument(
        "--budget",
        type=float,
        help="the suite's seconds: a piece whose estimate no longer fits is skipped, the CUDA tests get what is "
        "left (default: 360, --smoke 60)",
    )
    perf.add_argument("--repeats", type=int, help="timed repeats per measurement (default: 5)")
    perf.add_argument("--batch", type=int, help="adaptation batch size (default: 64)")
    perf.add_argument(
        "--only",
        help="comma-separated subset of: merged, step, small, precision, svd, memory, stream, corruptions, lab, "
        "startup, teach, methods (every method's step vs IMSE's; --models builtin works for it) (default: all; "
        "on 2 CPU cores the step benchmark at batch 64 alone takes ~15 min); with --suite, of its stages: "
        "methods, step, official, accuracy, lab, merged, stream, memory, tests",
    )
    perf.add_argument(
        "--models",
        help="timm ViTs of the step and small-batch benchmarks; the last one also runs the bf16 benchmark "
        "(default: vit_small_patch16_224,vit_base_patch16_224)",
    )
    perf.add_argument(
        "--per-domain",
        type=int,
        help="images per corruption of the bf16-vs-fp32 accuracy comparison (built-in stream; default: 1000)",
    )
    perf.add_argument(
        "--out", help="also write the results as JSON to this file (--suite: default perf_suite_<device>.json)"
    )
    perf.set_defaults(handler=perf_command)


def _check_perf(parser, args) -> None:
    """The suite sizes itself: the single benchmarks' sizes do not apply to it, nor its budget to them."""
    suite = args.suite or args.smoke
    sizing = [f"--{name.replace('_', '-')}" for name in ("repeats", "batch", "models", "per_domain")
              if getattr(args, name) is not None]  # fmt: skip
    if suite and sizing:
        parser.error(f"--suite sizes itself ({', '.join(sizing)} do not apply; --smoke makes it tiny)")
    if not suite and args.budget is not None:
        parser.error("--budget applies to --suite")
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be positive")


def _add_train_builtin(commands) -> None:
    train = commands.add_parser(
        "train-builtin",
        help="train the built-in offline ViT on Fashion-MNIST and export assets/builtin",
        description="Trains the small built-in ViT on Fashion-MNIST (Debian package dataset-fashion-mnist) and "
        "writes its weights, config, data copies and model card. Resumes from <out-dir>/train_state.pt.",
    )
    train.add_argument("--data-dir", help="folder with the four Fashion-MNIST idx files (default: Debian's)")
    train.add_argument("--out-dir", default="assets/builtin", help="where to write the assets (default: %(default)s)")
    train.add_argument("--epochs", type=int, default=40)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, help="use only the first N images of each split (smoke tests)")
    train.add_argument("--restart", action="store_true", help="ignore an existing train_state.pt")
    train.set_defaults(handler=train_builtin_command)


def _add_bench(commands) -> None:
    from imse.runs.defaults import COMPARED, PRESETS

    bench = commands.add_parser(
        "bench",
        help="accuracy of Source/TENT/SAR/IMSE on a corrupted test stream (markdown table + JSON)",
        description="Streams the same corrupted batches through every method and reports per-domain accuracy.",
    )
    _add_model_args(bench, severity=None, batch_size=None)
    bench.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="a Lab story's stream and methods (default: the Lab's default run's stream; methods "
        f"{','.join(COMPARED)}); flags given explicitly win",
    )
    bench.add_argument("--methods", help="comma-separated, e.g. source,imse,imse@retrieval=top1")
    bench.add_argument("--scenario", choices=("single", "continual", "gradual", "recurring"))
    bench.add_argument("--per-domain", type=int, help="images per domain")
    bench.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    bench.add_argument("--corruptions", help="'test' (the 15), 'validation' (the 4) or comma-separated names")
    bench.add_argument("--rounds", type=int, help="rounds of the recurring scenario")
    bench.add_argument(
        "--protocol",
        choices=("paper", "lab"),
        help="evaluation rules: 'paper' = the official code's (RobustBench's 5,000 images re-zoomed, retrieval, "
        "E0 = 0.4 ln 1000, ...; the default on imagenet-c), 'lab' = ours (the default otherwise); docs/protocol.md",
    )
    bench.add_argument("--imagenet-val", metavar="ROOT", help="ImageNet val (wnid folders) for the bank's slot 0")
    bench.add_argument("--hparams", help="sweep JSON whose chosen learning rates to use")
    bench.add_argument("--lr", action="append", metavar="METHOD=LR", help="override one method's lr")
    bench.add_argument("--checkpoint", action="append", metavar="METHOD=FILE",
                       help="the file a method starts from: vida=FILE, its source warm-up (python -m imse "
                       "vida-warmup, or the official 'source ViDA model'); required for ViDA under "
                       "--protocol paper")  # fmt: skip
    bench.add_argument("--upload-streams", choices=("as-is", "corrupted"), default="as-is",
                       help="your own images (--data PATH): as they are, your domains being the shifts, or through "
                       "--corruptions, each a domain over all of them (default: %(default)s)")  # fmt: skip
    bench.add_argument("--unlabelled", action="store_true",
                       help="your own images: ignore their class folders (reports agreement with Source, confidence "
                       "and entropy instead of accuracy)")  # fmt: skip
    _add_precision(bench)
    bench.add_argument("--out", help="write the full result as JSON")
    bench.set_defaults(handler=bench_command)


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="tune each method on the validation corruptions (same lr grid and images for all)",
        description="Each adaptive method runs at its default lr x (0.03, 0.1, 0.3, 1, 3, 10), then (at the chosen "
        "lr) the entropy margin's class count (SAR, IMSE, DPAL) and IMSE's lambda_dm, on continual streams of the four "
        "validation corruptions at each severity; the best mean accuracy wins. Writes every grid as JSON.",
    )
    _add_model_args(sweep)
    sweep.add_argument("--methods", help="comma-separated (default: every adapting method in the registry)")
    sweep.add_argument("--update", metavar="SWEEP_JSON", help="add these methods to an earlier sweep of the same "
                       "protocol (refused if it differs); --out gets the merged file")  # fmt: skip
    sweep.add_argument("--severities", default="3,5", help="comma-separated (default: %(default)s)")
    sweep.add_argument("--per-domain", type=int, default=2000, help="images per corruption (default: %(default)s)")
    sweep.add_argument("--seed", type=int, default=0)
    sweep.add_argument("--out", default="sweep.json")
    sweep.add_argument("--dry-run", action="store_true", help="print each method's grid and checks, run nothing")
    sweep.set_defaults(handler=sweep_command)


def _add_shifts(commands) -> None:
    from imse.core.bank import SHIFT_THRESHOLD

    shifts = commands.add_parser(
        "shifts",
        help="shift-detection precision/recall on continual and gradual streams, false alarms without shifts",
    )
    _add_model_args(shifts)
    shifts.add_argument("--per-domain", type=int, default=500)
    shifts.add_argument("--seeds", default="0,1,2")
    shifts.add_argument("--threshold", type=float, default=SHIFT_THRESHOLD, help="τ (default: %(default)s)")
    shifts.add_argument("--stationary-batches", type=int, default=1000)
    shifts.add_argument("--out")
    shifts.set_defaults(handler=shifts_command)


def _add_reproduce(commands) -> None:
    from imse.runs.defaults import COMPARED

    repro = commands.add_parser(
        "reproduce",
        help="the paper's rows under its protocol (ImageNet-C/R/A), our table beside its numbers; resumable",
        description="Runs backbone x dataset x scenario x method x seed with --protocol paper (docs/protocol.md) "
        "and writes each finished run to --out at once: rerunning the same command skips finished runs.",
    )
    repro.add_argument("--imagenet-c", required=True, metavar="ROOT", help="<corruption>/<severity>/<wnid>/*.JPEG")
    repro.add_argument("--imagenet-val", metavar="ROOT", help="ImageNet val (wnid folders): the bank's slot 0")
    repro.add_argument("--imagenet-r", metavar="ROOT", help="ImageNet-R (wnid folders)")
    repro.add_argument("--imagenet-a", metavar="ROOT", help="ImageNet-A (wnid folders)")
    repro.add_argument("--backbones", default="supervised", help="comma-separated: supervised, clip, mae")
    repro.add_argument("--weights", action="append", metavar="BACKBONE=FILE", help="a local checkpoint (mae needs one)")
    repro.add_argument("--methods", default=",".join(COMPARED), help="comma-separated methods (default: %(default)s)")
    repro.add_argument("--scenarios", help="only these rows, e.g. single,continual (default: all)")
    repro.add_argument("--corruptions", default="test", help="ImageNet-C: 'test' (the 15) or comma-separated names")
    repro.add_argument("--seeds", default="0", help="comma-separated seeds")
    repro.add_argument("--per-domain", type=int, default=5000, help="ImageNet-C images per domain (paper: 5000)")
    repro.add_argument("--batch-size", type=int, default=64)
    repro.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    repro.add_argument("--out", default="reproduce.json", help="results JSON (also what a rerun resumes from)")
    repro.add_argument("--engine", choices=("local", "ray"), default="local", help="ray: one task per run")
    repro.add_argument("--address", help="a Ray cluster's address (default: start a local one)")
    repro.add_argument(
        "--checkpoint",
        action="append",
        metavar="METHOD=FILE",
        help="the file a method starts from (vida=FILE: its source warm-up; required for ViDA)",
    )
    _add_precision(repro)
    repro.add_argument("--dry-run", action="store_true", help="print the plan (every run; each method's "
                       "preprocessing, checkpoint and retrieval) and run nothing")  # fmt: skip
    repro.set_defaults(handler=reproduce_command)


def _add_soak(commands) -> None:
    soak = commands.add_parser(
        "soak",
        help="a long gradual stream through the app's run loop: no NaN/inf, flat memory, bank within capacity",
        description="Streams the gradual scenario (9 severities per corruption) with IMSE + top-1 retrieval and "
        "Source on the built-in backbone, as the app runs it; exits 1 if any record holds NaN/inf, resident "
        "memory grew more than 5 %% after the first domain, or the bank exceeded its capacity.",
    )
    soak.add_argument("--per-domain", type=int, default=64, help="images per domain (default: 64)")
    soak.add_argument("--corruptions", help="comma-separated (default: the 15 test corruptions: 135 domains)")
    soak.add_argument("--batch-size", type=int, default=64)
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--device", default="cpu")
    soak.add_argument("--out", help="also write the result as JSON")
    soak.set_defaults(handler=soak_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imse",
        description="IMSE Lab: test-time adaptation of Vision Transformers by their spectral experts.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_perf, _add_train_builtin, _add_bench, _add_sweep, _add_shifts, _add_reproduce, _add_vida_warmup,
                _add_soak):  # fmt: skip
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "only", None):
        from imse.perf import ALL_BENCHMARKS
        from imse.perf.suite import STAGES

        known = STAGES if args.suite or args.smoke else ALL_BENCHMARKS
        unknown = {part.strip() for part in args.only.split(",") if part.strip()} - set(known)
        if unknown:
            parser.error(f"--only: unknown measure(s) {sorted(unknown)}")
    if getattr(args, "command", None) == "perf":
        _check_perf(parser, args)
    for option in ("repeats", "batch", "batch_size", "per_domain", "epochs"):
        if getattr(args, option, 1) is not None and getattr(args, option, 1) < 1:
            parser.error(f"--{option.replace('_', '-')} must be positive")
    from imse.runs.memory import keep_freed_memory

    # only once a command is about to compute (not for --help or a usage error): glibc then keeps freed memory
    # in the process, so a step does not page-fault its activations in again (release_memory trims at the end)
    keep_freed_memory()
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # bad input or unavailable data: say so
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
