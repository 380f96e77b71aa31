"""The suite's last stage: the project's CUDA tests, in a fresh interpreter, for whatever time the suite has left.

The CUDA tests are the test modules that take ``CUDA`` from ``tests/conftest.py`` (a parameter skipped without a
GPU), run with ``-k cuda``. Outcomes are read line by line as pytest prints them (``-v``), so a run stopped at its
time still reports every test that finished; a module that cannot be imported (a GPU image without Gradio, say)
is reported by name and the others run (``--continue-on-collection-errors``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from imse.perf.timing import check

OUTCOME = re.compile(r"^(?P<test>\S+::\S+) (?P<outcome>PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
COLLECTING = re.compile(r"^_+ ERROR collecting (?P<module>\S+) _+$")  # then the error's "E   ..." line


def tests_folder() -> Path | None:
    """The checkout's ``tests`` folder beside the package (an installed package has none)."""
    folder = Path(__file__).resolve().parents[2] / "tests"
    return folder if (folder / "conftest.py").is_file() else None


def cuda_test_arguments(folder: Path) -> list[str]:
    """pytest's arguments for the CUDA tests: every module importing ``CUDA`` from conftest, ``-k cuda``."""
    marker = re.compile(r"^from conftest import .*\bCUDA\b", re.MULTILINE)
    modules = sorted(str(path) for path in folder.glob("test_*.py") if marker.search(path.read_text()))
    return [*modules, "-k", "cuda"]


def run_tests(arguments: list[str], *, seconds: float, log: Path | None = None, cwd: Path | None = None) -> dict:
    """``python -m pytest -v ARGUMENTS`` stopped after ``seconds``: each test's outcome, the modules that could not
    be collected, whether time ran out; ``log`` receives pytest's output as it comes."""
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               *arguments]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               encoding="utf-8", errors="replace")  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=_read, args=(process, lines, log), daemon=True)
    reader.start()
    try:
        process.wait(timeout=max(seconds, 0.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        timed_out = True
    reader.join(timeout=5.0)  # a process the tests started may still hold the pipe: what was read is kept
    result = _outcomes(list(lines))
    result.update(command=command, seconds=time.perf_counter() - started, timed_out=timed_out,
                  returncode=process.returncode, limit_s=seconds)  # fmt: skip
    result["checks"] = _rows(result)
    return result


def _read(process: subprocess.Popen, lines: list[str], log: Path | None) -> None:
    with open(log if log else os.devnull, "w") as out:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            out.write(line)
            out.flush()


def _outcomes(lines: list[str]) -> dict:
    tests: dict[str, str] = {}
    modules: dict[str, str] = {}
    collecting = None
    for line in lines:
        if found := OUTCOME.match(line):
            tests[found["test"]] = found["outcome"]
        elif found := COLLECTING.match(line):
            collecting = found["module"]
            modules[collecting] = "could not be collected"
        elif collecting and line.startswith("E   "):
            modules[collecting], collecting = line[4:].strip(), None
    counts = {name.lower(): sum(o == name for o in tests.values()) for name in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    failed = sorted(test for test, o in tests.items() if o in ("FAILED", "ERROR"))
    return {**counts, "tests": tests, "failed_tests": failed, "not_collected": modules}


def _rows(result: dict) -> list[dict]:
    ran = result["passed"] + result["failed"] + result["error"]
    said = (
        f"{result['passed']} passed, {result['failed']} failed, {result['error']} errors, {result['skipped']} skipped"
    )
    cut = f"; stopped at {result['limit_s']:.0f} s" if result["timed_out"] else ""
    met = None if ran == 0 else (result["failed"] + result["error"] == 0 and not result["timed_out"])
    rows = [check(f"CUDA tests (pytest, {result['seconds']:.0f} s{cut})", said, "-", "none fails", met)]
    rows += [check(f"CUDA tests: {Path(module).name} not collected", why[:100], "-", "-", None)
             for module, why in result["not_collected"].items()]  # fmt: skip
    return rows
