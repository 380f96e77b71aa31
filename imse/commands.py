"""The CLI's commands: each reads its parsed arguments, calls the library and prints or writes the result
(``imse.__main__`` builds the parser and dispatches here)."""

from __future__ import annotations

import argparse


def perf_command(args: argparse.Namespace) -> int:
    from imse.perf import ALL_BENCHMARKS, STEP_MODELS, run_perf

    only = None if args.only is None else tuple(part.strip() for part in args.only.split(",") if part.strip())
    if args.suite or args.smoke:
        return _perf_suite(args, only)
    models = STEP_MODELS if args.models is None else tuple(m.strip() for m in args.models.split(",") if m.strip())
    run_perf(
        device=args.device,
        repeats=5 if args.repeats is None else args.repeats,
        batch=64 if args.batch is None else args.batch,
        only=ALL_BENCHMARKS if only is None else only,
        out=args.out,
        models=models,
        per_domain=1000 if args.per_domain is None else args.per_domain,
    )
    return 0


def _perf_suite(args: argparse.Namespace, only: tuple[str, ...] | None) -> int:
    """The suite (``imse.perf.suite``): GPU sizes, or the smoke's; exit status 1 when a piece failed."""
    from imse.perf.suite import GPU, SMOKE, STAGES
    from imse.perf.suite_run import run_suite

    results = run_suite(device=args.device, sizes=SMOKE if args.smoke else GPU, out=args.out,
                        stages=STAGES if only is None else only, budget_s=args.budget)  # fmt: skip
    return 1 if results.get("failures") else 0


def train_builtin_command(args: argparse.Namespace) -> int:
    from imse.runs.builtin import train_builtin

    summary = train_builtin(
        data_dir=args.data_dir,
        out_dir=args.out_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        resume=not args.restart,
        limit=args.limit,
    )
    accuracy, seconds = summary["test_accuracy"] * 100, summary["train_seconds"]
    print(f"test accuracy {accuracy:.2f} % after {seconds:.0f} s; wrote {args.out_dir}")
    return 0


def _data(args: argparse.Namespace) -> str:
    """``--data``, else the backbone's own (its card's)."""
    from imse.data.backbones import backbone_data

    return args.data or backbone_data(args.backbone)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def bench_settings(args: argparse.Namespace) -> dict:
    """``bench``'s stream and methods: the flags given, else the preset's (``--preset``, default: the Lab's
    default run, so ``python -m imse bench`` runs exactly what the app's Start runs, plus SAR)."""
    from imse.runs.defaults import COMPARED, lab_settings, run_methods

    preset = lab_settings(args.preset or "default", args.backbone)
    if args.methods:
        methods = _csv(args.methods)
    elif args.preset:
        methods = run_methods(preset)  # the preset's Lab methods, by their Lab labels
    else:
        methods = COMPARED
    corruptions = args.corruptions or preset["corruptions"]
    if isinstance(corruptions, str) and corruptions not in ("test", "validation"):
        corruptions = _csv(corruptions)
    return dict(
        methods=methods,
        scenario=args.scenario or preset["scenario"],
        severity=args.severity or preset["severity"],
        per_domain=args.per_domain or preset["per_domain"],
        batch_size=args.batch_size or preset["batch_size"],
        corruptions=corruptions,
        rounds=args.rounds or preset["rounds"],
    )


def bench_command(args: argparse.Namespace) -> int:
    import json

    from imse.runs.bench import format_summary, format_table, load_lrs, run_bench

    lrs = load_lrs(args.hparams)
    for item in args.lr or []:
        method, _, value = item.partition("=")
        lrs[method] = float(value)
    data, imagenet_c = _data(args), None
    if data.startswith("imagenet-c:"):
        data, imagenet_c = "imagenet-c", data.removeprefix("imagenet-c:")
    result = run_bench(
        backbone=args.backbone,
        weights=args.weights,
        data=data,
        seeds=tuple(int(s) for s in _csv(args.seeds)),
        device=args.device,
        lrs=lrs,
        checkpoints=_pairs(args.checkpoint, "METHOD=FILE"),
        imagenet_c=imagenet_c,
        imagenet_val=args.imagenet_val,
        protocol=args.protocol,
        precision=args.precision,
        upload_streams=args.upload_streams,
        unlabelled=args.unlabelled,
        **bench_settings(args),
    )
    if args.preset:
        result["config"]["preset"] = args.preset
    print(format_table(result))
    print()
    print(format_summary(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.out}")
    return 0


def _print_sweep_plan(methods: tuple[str, ...], args: argparse.Namespace) -> int:
    from imse.runs.sweep import plan_sweep

    severities = _csv(args.severities)
    for method, entry in plan_sweep(methods, batch_size=args.batch_size).items():
        checks = "; ".join(f"then {key} in {list(values)}" for key, values in entry["checks"].items())
        runs = len(entry["lrs"]) + sum(len(values) for values in entry["checks"].values())
        print(
            f"{method}: lr in {entry['lrs']}{'; ' + checks if checks else ''} ({runs} settings, each with Source "
            f"on the 4 validation corruptions at severities {', '.join(severities)}, {args.per_domain} images each)"
        )
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    import json

    from imse.runs.sweep import run_sweep

    earlier = None
    if args.update:  # read and checked before hours of runs, not after
        with open(args.update) as handle:
            earlier = json.load(handle)
        if not isinstance(earlier, dict) or not {"protocol", "methods", "versions"} <= earlier.keys():
            raise ValueError(f"{args.update} is not a sweep's JSON (python -m imse sweep --out)")
    from imse.core.methods import adaptive_methods

    methods = _csv(args.methods) if args.methods else adaptive_methods()  # by default every adapting method
    if args.dry_run:
        return _print_sweep_plan(methods, args)
    result = run_sweep(
        backbone=args.backbone,
        weights=args.weights,
        data=_data(args),
        methods=methods,
        severities=tuple(int(s) for s in _csv(args.severities)),
        per_domain=args.per_domain,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        earlier=earlier,
    )
    for method in methods:
        entry = result["methods"][method]
        print(f"{method}: chose {entry['chosen']} in {entry['runs']} runs")
        for stage in entry["stages"]:
            grid = ", ".join(f"{value}: {100 * acc:.2f}" for value, acc in stage["grid"].items())
            print(f"  {stage['setting']}: {grid}")
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}; use it with: python -m imse bench --hparams {args.out}")
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    from imse.runs.reproduce import describe_plan, format_reproduction, paper_architectures, plan, reproduce

    roots = {name: root for name, root in (("imagenet-c", args.imagenet_c), ("imagenet-r", args.imagenet_r),
                                           ("imagenet-a", args.imagenet_a)) if root}  # fmt: skip
    weights = _pairs(args.weights, "BACKBONE=FILE")
    checkpoints = _pairs(args.checkpoint, "METHOD=FILE")
    if args.dry_run:
        jobs = plan(list(roots), _csv(args.backbones), _csv(args.methods), tuple(int(s) for s in _csv(args.seeds)),
                    _csv(args.scenarios) if args.scenarios else None)  # fmt: skip
        text = describe_plan(jobs, checkpoints, paper_architectures())
        print(text)
        return 2 if "\nrefused: " in text else 0
    result = reproduce(
        roots=roots,
        out=args.out,
        backbones=_csv(args.backbones),
        methods=_csv(args.methods),
        seeds=tuple(int(s) for s in _csv(args.seeds)),
        scenarios=_csv(args.scenarios) if args.scenarios else None,
        corruptions=args.corruptions if args.corruptions == "test" else _csv(args.corruptions),
        weights=weights,
        imagenet_val=args.imagenet_val,
        device=args.device,
        per_domain=args.per_domain,
        batch_size=args.batch_size,
        engine=args.engine,
        address=args.address,
        checkpoints=checkpoints,
        precision=args.precision,
    )
    print(format_reproduction(result))
    print(f"wrote {args.out} (rerun the same command to resume; finished runs are not redone)")
    return 0


def vida_warmup_command(args: argparse.Namespace) -> int:
    from imse.runs.vida_warmup import warm_up

    made = warm_up(args.out, backbone=args.backbone, weights=args.weights, data=args.data,
                   preprocessing=args.preprocessing, device=args.device, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed)  # fmt: skip
    before, after = made["held_out_accuracy_before"], made["held_out_accuracy_after"]
    held_out = f"; clean held-out accuracy {before} -> {after}" if after != "None" else ""
    print(f"wrote {args.out}: {made['steps']} steps on {made['data']}, final loss {made['final_loss']}{held_out}")
    print(f"use it with: python -m imse bench --methods vida --checkpoint vida={args.out}")
    return 0


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["vida=FILE", ...]`` -> ``{"vida": "FILE"}``; an item without ``=`` is refused."""
    pairs = {}
    for item in items or []:
        key, equals, value = item.partition("=")
        if not equals or not key or not value:
            raise ValueError(f"expected {what}, got {item!r}")
        pairs[key] = value
    return pairs


def soak_command(args: argparse.Namespace) -> int:
    import json

    from imse.data.corruptions import CORRUPTIONS
    from imse.runs.soak import run_soak

    result = run_soak(
        per_domain=args.per_domain,
        corruptions=tuple(_csv(args.corruptions)) if args.corruptions else CORRUPTIONS,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"gradual stream: {result['domains']} domains, {result['images']:,} images in "
        f"{result['seconds']:.0f} s\n"
        f"resident memory after the first domain {result['rss_after_first_domain'] / 2**20:.0f} MiB, at the end "
        f"{result['rss_at_end'] / 2**20:.0f} MiB ({100 * result['rss_growth']:+.2f} %)\n"
        f"non-finite values in records: {result['non_finite_count']}; bank at most {result['bank_max']} of "
        f"{result['bank_capacity']} slots"
    )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    ok = (
        result["non_finite_count"] == 0
        and result["rss_growth"] <= 0.05
        and result["bank_max"] <= result["bank_capacity"]
    )
    return 0 if ok else 1


def shifts_command(args: argparse.Namespace) -> int:
    import json

    from imse.runs.shifts import run_shift_detection

    result = run_shift_detection(
        backbone=args.backbone,
        weights=args.weights,
        data=_data(args),
        severity=args.severity,
        per_domain=args.per_domain,
        batch_size=args.batch_size,
        seeds=tuple(int(s) for s in _csv(args.seeds)),
        threshold=args.threshold,
        stationary_batches=args.stationary_batches,
        device=args.device,
    )
    print("| stream | precision | recall |\n|---|---|---|")
    for scenario, entry in result["scenarios"].items():
        print(f"| {scenario} | {entry['precision']:.3f} | {entry['recall']:.3f} |")
    for name, entry in result["stationary"].items():
        print(
            f"no shift ({name}): {entry['false_detections']} false detections in {entry['batches']} batches "
            f"({entry['per_1000_batches']:.1f} per 1000), max score {entry['max_score']:.4f}"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
