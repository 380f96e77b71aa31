"""The layers stay visible: core → data → runs → app, arrows only downward, and nothing below the app imports the
UI libraries."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imse"
LAYERS = ["core", "data", "runs", "app"]  # bottom to top; imse/perf and imse/__main__.py sit above them all

CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    ui = sorted(m for m in ("gradio", "plotly") if m in sys.modules)
    print(name, *ui)
"""


def modules_below_the_app() -> list[str]:
    names = []
    for layer in LAYERS[:-1]:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_layers(path: Path) -> set[str]:
    """The layers a module imports from (absolute ``imse.<layer>`` imports, at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "imse" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_core_data_and_runs_import_neither_gradio_nor_plotly():
    """One fresh interpreter imports each module in turn (from the bottom up) and reports the UI libraries
    loaded so far: the first module that pulls one in is named."""
    below = ["imse", *modules_below_the_app()]
    assert "imse.core.methods" in below and "imse.runs.lab" in below
    result = subprocess.run([sys.executable, "-c", CHECK, *below], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:-1] == below


def test_every_module_imports_only_its_own_layer_or_those_below():
    upward = []
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            wrong = imported_layers(path) - allowed
            if wrong:
                upward.append(f"{path.relative_to(PACKAGE)} imports imse.{', imse.'.join(sorted(wrong))}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The static check is not vacuous: a module that reaches up a layer, even inside a function, is caught."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from imse.app import viz\n    import imse.runs.lab\n")
    assert imported_layers(module) == {"app", "runs"}


def test_relative_imports_are_not_used_across_layers():
    """Absolute imports only, so that the layer a module reaches into is visible at the import line."""
    relative = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(ast.parse(path.read_text())))
    ]
    assert relative == []
