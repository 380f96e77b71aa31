"""The layers stay visible: nothing below the app imports the UI libraries."""

import subprocess
import sys

BELOW_THE_APP = ["imse", "imse.spectral", "imse.methods", "imse.data", "imse.runner", "imse.bench", "imse.lab"]

CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    ui = sorted(m for m in ("gradio", "plotly") if m in sys.modules)
    print(name, *ui)
"""


def test_the_core_data_and_runs_import_neither_gradio_nor_plotly():
    """One fresh interpreter imports each module in turn (from the bottom up) and reports the UI libraries
    loaded so far: the first module that pulls one in is named."""
    result = subprocess.run([sys.executable, "-c", CHECK, *BELOW_THE_APP], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:-1] == BELOW_THE_APP
