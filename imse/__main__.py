"""Command line: ``python -m imse <command>``; ``python -m imse --help`` lists the commands."""

from __future__ import annotations

import argparse
import sys


def _perf(args: argparse.Namespace) -> int:
    from .perf import run_perf

    run_perf(device=args.device, repeats=args.repeats, batch=args.batch, only=tuple(args.only.split(",")), out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imse",
        description="IMSE Lab: test-time adaptation of Vision Transformers by their spectral experts.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    perf = commands.add_parser(
        "perf",
        help="speed benchmarks (medians, ratios against a baseline timed in the same run)",
        description="Times merged-IMSE vs plain timm inference, an IMSE vs a SAR adaptation step "
        "(vit_small_patch16_224, random init), the one-time SVD cost of ViT-B/16, and batched corruption of 64 "
        "images at 224 px vs corrupt-tta image by image (when installed).",
    )
    perf.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    perf.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (default: 10)")
    perf.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    perf.add_argument(
        "--only", default="merged,step,svd,corruptions", help="comma-separated subset of: merged,step,svd,corruptions"
    )
    perf.add_argument("--out", help="also write the results as JSON to this file")
    perf.set_defaults(handler=_perf)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "only", None):
        unknown = set(args.only.split(",")) - {"merged", "step", "svd", "corruptions"}
        if unknown:
            parser.error(f"--only: unknown measure(s) {sorted(unknown)}")
    if getattr(args, "repeats", 1) < 1 or getattr(args, "batch", 1) < 1:
        parser.error("--repeats and --batch must be positive")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
