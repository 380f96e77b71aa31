import json
import subprocess
import sys

import pytest

from imse.__main__ import main


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "imse", "--help"], capture_output=True, text=True, check=True)
    assert "perf" in result.stdout


def test_perf_writes_ratios(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert main(["perf", "--only", "merged", "--repeats", "1", "--batch", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    merged = results["merged_forward"]
    assert merged["ratio"] == merged["merged_forward_s"] / merged["plain_forward_s"] > 0
    assert "merged IMSE fwd / timm fwd" in capsys.readouterr().out


def test_perf_rejects_unknown_measure(capsys):
    with pytest.raises(SystemExit):
        main(["perf", "--only", "speed"])
    assert "unknown measure" in capsys.readouterr().err
