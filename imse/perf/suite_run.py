"""Running the suite's plan within its budget, writing the JSON and the markdown table after every piece.

Every piece leaves a row: its own (done), a FAILED one with the error (the rest still run: one broken piece must not
cost the others on a machine lent for minutes), or a skipped one with the reason (its estimate, scaled by how far
the finished pieces were off theirs, no longer fits the time left; or what it needs did not run). Both files are
replaced whole after each piece (a temporary file renamed over the old), so a run cut off at any moment leaves
every finished row in both.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from imse.perf.suite import GPU, STAGES, Piece, Skip, SuiteSizes, plan
from imse.perf.timing import check

TESTS_LEAST_S = 10.0  # below this, the CUDA tests are skipped rather than started
WRITE_MARGIN_S = 3.0  # kept back from the tests' time for the last writes
LEFT_OVER_BYTES = 1 << 30  # GPU memory still allocated after a piece that calls for a collection


def output_paths(out: str | os.PathLike | None, device: torch.device) -> dict[str, Path]:
    """The JSON (``out``, default ``perf_suite_<device>.json``), the table beside it (.md) and the tests' log."""
    json_path = Path(out) if out else Path(f"perf_suite_{device.type}.json")
    return {"json": json_path, "table": json_path.with_suffix(".md"),
            "log": json_path.with_name(json_path.stem + "_tests.log")}  # fmt: skip


def run_suite(
    *,
    device: str = "cuda",
    sizes: SuiteSizes = GPU,
    out: str | os.PathLike | None = None,
    stages: tuple[str, ...] = STAGES,
    budget_s: float | None = None,
    on_piece: Callable[[int, dict], None] | None = None,
) -> dict:
    """Plan, print the plan, run it piece by piece within ``budget_s`` (default: the sizes'), writing as it goes.
    ``on_piece(index, entry)`` is called after each piece is written."""
    dev = torch.device(device)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown suite stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    budget = sizes.budget_s if budget_s is None else budget_s
    threads = torch.get_num_threads()
    if sizes.threads is not None:
        torch.set_num_threads(sizes.threads)
    try:
        return _run(dev, sizes, output_paths(out, dev), stages, budget=budget, on_piece=on_piece)
    finally:
        torch.set_num_threads(threads)


def _run(dev: torch.device, sizes: SuiteSizes, paths: dict, stages: tuple[str, ...], *, budget: float, on_piece):
    from imse.perf import environment, format_table

    started = time.perf_counter()  # the budget counts the planning too
    pieces = plan(dev, sizes, stages)
    entries = [{"stage": p.stage, "label": p.label, "estimate_s": round(p.estimate_s, 2), "calls": p.calls,
                "builds": p.builds, "status": "planned"} for p in pieces]  # fmt: skip
    suite = {
        "sizes": dataclasses.asdict(sizes),
        "budget_s": budget,
        "estimate_s": round(sum(p.estimate_s for p in pieces), 1),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pieces": entries,
    }
    results = {**environment(dev), "suite": suite}
    print(plan_text(results), flush=True)
    _write(paths, results)
    for index, (piece, entry) in enumerate(zip(pieces, entries)):
        _run_piece(piece, entry, results, started=started, budget=budget, log=paths["log"])
        results["suite"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        _write(paths, results)
        print(_progress(index, len(pieces), entry, results["suite"]["elapsed_s"], budget), flush=True)
        if on_piece is not None:
            on_piece(index, entry)
    print(format_table(results))
    print(f"wrote {paths['json']} and {paths['table']}")
    return results


def _run_piece(piece: Piece, entry: dict, results: dict, *, started: float, budget: float, log: Path) -> None:
    """Run one piece (or skip it) and put its rows where they belong."""
    left = budget - (time.perf_counter() - started)
    expected = piece.estimate_s * _calibration(results["suite"]["pieces"])
    begun = time.perf_counter()
    try:
        if piece.stage == "tests":
            if left - WRITE_MARGIN_S < TESTS_LEAST_S:
                raise Skip(f"{left:.0f} s left of the budget")
            result = piece.run(results, left - WRITE_MARGIN_S, log)
        elif expected > left:
            raise Skip(f"budget: needs ~{expected:.0f} s, {max(left, 0):.0f} s left")
        else:
            result = piece.run(results)
        entry["status"] = "done"
        _store(results, piece, result)
    except Skip as why:
        entry.update(status="skipped", note=str(why))
        results.setdefault("not_run", []).append({"checks": [check(piece.label, f"skipped: {why}", "-", "-", None)]})
    except Exception as error:  # one broken piece must not cost the others
        traceback.print_exc()
        entry.update(status="failed", note=f"{type(error).__name__}: {error}"[:300])
        results.setdefault("failures", []).append({"checks": [check(piece.label, f"FAILED: {entry['note']}", "-",
                                                                    "-", False)]})  # fmt: skip
    entry["seconds"] = round(time.perf_counter() - begun, 2)
    _free_device_memory()


def _free_device_memory() -> None:
    """After a piece nothing of it should hold GPU memory; what reference cycles still hold is collected (a full
    collection takes ~0.5 s with torch and timm loaded: only when memory is held, not after every piece)."""
    if torch.cuda.is_available() and torch.cuda.memory_allocated() > LEFT_OVER_BYTES:
        gc.collect()
        torch.cuda.empty_cache()


def _store(results: dict, piece: Piece, result: dict) -> None:
    if piece.many:
        results.setdefault(piece.key, []).append(result)
    else:
        results[piece.key] = result


def _calibration(entries: list[dict]) -> float:
    """How far the finished pieces were off their estimates (measured / estimated), within 1/4 .. 4."""
    done = [e for e in entries if e["status"] == "done" and e["estimate_s"] > 0 and e["stage"] != "tests"]
    estimated = sum(e["estimate_s"] for e in done)
    return 1.0 if not estimated else min(4.0, max(0.25, sum(e["seconds"] for e in done) / estimated))


def _write(paths: dict[str, Path], results: dict) -> None:
    """Both files, each replaced whole (written beside, then renamed over the old one)."""
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (paths["json"], json.dumps(results, indent=1, default=str)),
        (paths["table"], table_text(results)),
    ):
        temporary = path.with_name(path.name + ".part")
        temporary.write_text(text)
        os.replace(temporary, path)


def _by_stage(results: dict) -> list[tuple]:
    rows = []
    entries = results["suite"]["pieces"]
    for stage in dict.fromkeys(e["stage"] for e in entries):
        mine = [e for e in entries if e["stage"] == stage]
        count = {status: sum(e["status"] == status for e in mine) for status in ("done", "failed", "skipped")}
        took = sum(e.get("seconds", 0.0) for e in mine)
        estimate = "rest" if stage == "tests" else f"{sum(e['estimate_s'] for e in mine):.1f}"
        calls, builds = sum(e["calls"] for e in mine), sum(e["builds"] for e in mine)
        rows.append((stage, len(mine), calls, builds, estimate, count["done"], count["failed"], count["skipped"], took))
    return rows


def plan_text(results: dict) -> str:
    """The plan as printed before anything runs: per stage its pieces, timed calls, builds and estimate."""
    suite = results["suite"]
    lines = [f"perf suite ({suite['sizes']['name']} sizes) on {results['device']} ({results['device_name']}): "
             f"{len(suite['pieces'])} pieces, estimated {suite['estimate_s']:.0f} s of a {suite['budget_s']:.0f} s "
             "budget; the CUDA tests get what is left",
             "| stage | pieces | timed calls | builds | estimate (s) |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in _by_stage(results)]
    return "\n".join(lines)


def table_text(results: dict) -> str:
    """The markdown file: the run's header, its stages (planned and done) and every row so far."""
    from imse.perf import format_table

    suite = results["suite"]
    versions = results["versions"]
    lines = [
        f"# perf suite ({suite['sizes']['name']}): {results['device_name']}, {suite['started']}",
        "",
        f"torch {versions['torch']}, imse {versions['imse']}; budget {suite['budget_s']:.0f} s, estimated "
        f"{suite['estimate_s']:.0f} s, elapsed {suite.get('elapsed_s', 0):.0f} s",
        "",
        "| stage | pieces | done | failed | skipped | estimate (s) | took (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[5]} | {r[6]} | {r[7]} | {r[4]} | {r[8]:.1f} |" for r in _by_stage(results)]
    lines += ["", *format_table(results).splitlines()[1:], ""]
    return "\n".join(lines)


def _progress(index: int, total: int, entry: dict, elapsed: float, budget: float) -> str:
    said = entry["status"] + (f" ({entry['note']})" if entry.get("note") else "")
    return (f"[{index + 1}/{total}] {entry['label']}: {said}, {entry['seconds']:.1f} s (estimated "
            f"{entry['estimate_s']:.1f} s); {elapsed:.0f} of {budget:.0f} s")  # fmt: skip
