"""The project's promises about itself: quick start, CI command and dependency lists stay in step."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Quick start")
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text[start:], re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_quick_start_has_run_and_test_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    run, test = commands
    assert run.startswith("pip install") and "python" in run
    assert test.startswith("pip install") and "pytest" in test
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_requirements_match_pyproject_and_respect_the_torch_cap():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert requirements == project["dependencies"]
    caps = {"torch": "2.14.1", "torchvision": "0.29.1"}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        if name in caps:
            assert f"<={caps[name]}" in requirement, requirement


def test_every_package_ships():
    """pyproject lists packages explicitly (assets/ maps to imse.assets): a new subpackage must be added."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "imse").rglob("__init__.py")}
    assert found | {"imse.assets"} == listed


def test_space_front_matter_matches_requirements():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    front = text.split("---\n")[1]
    fields = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert fields["sdk"] == "gradio" and fields["app_file"] == "app.py"
    pinned = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("gradio")]
    assert pinned == [f"gradio=={fields['sdk_version']}"]
    assert len(fields["short_description"]) <= 60


def test_nothing_unpickles_untrusted_files():
    """Weights, codes, banks and data load through safetensors, ``torch.load(weights_only=True)`` or
    ``np.load(allow_pickle=False)`` only: no call in the package or the app may run pickled code."""
    import ast

    unsafe = []
    for path in [ROOT / "app.py", *sorted((ROOT / "imse").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                unsafe.append(where)
            if name in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
                unsafe.append(where)
            if name.startswith(("pickle.", "cPickle.", "dill.", "joblib.")) or name in ("pickle", "marshal.loads"):
                unsafe.append(where)
    assert unsafe == []
