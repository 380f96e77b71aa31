"""The Space's configuration: README.md's front matter against the Hub's documented fields and this project's pins.

Sources (the Hub's documentation, read from huggingface/hub-docs):
- Fields, types and allowed values: "Spaces Configuration Reference",
  https://huggingface.co/docs/hub/spaces-config-reference (docs/hub/spaces-config-reference.md, last changed in
  hub-docs e2ea087, 2026-03-20).
- ``license``: card metadata of any repository, https://huggingface.co/docs/hub/repositories-licenses.
- The Python versions ZeroGPU runs: https://huggingface.co/docs/hub/spaces-zerogpu ("Supported Versions").

Offline and fast: nothing here calls the hub or loads weights (tests/conftest.py sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
CONFIG_REFERENCE = "https://huggingface.co/docs/hub/spaces-config-reference"

# Every field the Spaces Configuration Reference lists, with its documented type.
STR, BOOL, INT, STR_LIST, STR_DICT = "string", "boolean", "int", "List[string]", "Dict[string, string]"
DOCUMENTED_FIELDS: dict[str, str | tuple[str, ...]] = {
    "title": STR,
    "emoji": STR,
    "colorFrom": STR,
    "colorTo": STR,
    "sdk": STR,
    "python_version": STR,
    "sdk_version": STR,
    "suggested_hardware": STR,
    "suggested_storage": STR,
    "app_file": STR,
    "app_build_command": STR,
    "app_port": INT,
    "base_path": STR,
    "fullWidth": BOOL,
    "header": STR,
    "short_description": STR,
    "models": STR_LIST,
    "datasets": STR_LIST,
    "tags": STR_LIST,
    "thumbnail": STR,
    "pinned": BOOL,
    "hf_oauth": BOOL,
    "hf_oauth_scopes": STR_LIST,
    "hf_oauth_expiration_minutes": INT,
    "hf_oauth_authorized_org": (STR, STR_LIST),
    "disable_embedding": BOOL,
    "startup_duration_timeout": STR,
    "custom_headers": STR_DICT,
    "preload_from_hub": STR_LIST,
    # Not in the Spaces reference: a repository card's license (repositories-licenses), also read from Spaces.
    "license": STR,
}
DOCUMENTED = {key: kinds if isinstance(kinds, tuple) else (kinds,) for key, kinds in DOCUMENTED_FIELDS.items()}
SDKS = ("gradio", "docker", "static")
COLORS = ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
HARDWARE = (
    *("cpu-basic", "cpu-upgrade"),
    *("t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "l40sx4", "l40sx8"),
    *("a10g-small", "a10g-large", "a10g-largex2", "a10g-largex4", "a100-large", "a100x4", "a100x8"),
)
STORAGE = ("small", "medium", "large")
HEADERS = ("mini", "default")
CUSTOM_HEADERS = ("cross-origin-embedder-policy", "cross-origin-opener-policy", "cross-origin-resource-policy")
ZEROGPU_PYTHONS = ("3.10", "3.12")  # spaces-zerogpu: 3.10.13 and 3.12.12
DURATION = re.compile(r"[1-9][0-9]*[smh]")  # "any valid duration (like 1h, 30m)"; the default is 30 minutes


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice (plain YAML keeps the last one silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    keys = [loader.construct_object(key) for key, _ in node.value]
    twice = sorted({str(key) for key in keys if keys.count(key) > 1})
    if twice:
        raise yaml.constructor.ConstructorError(None, None, f"keys given twice: {twice}", node.start_mark)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def front_matter(text: str) -> dict:
    """The YAML block README.md starts with (the Hub reads it only at the very top of the file)."""
    match = re.match(r"---\n(.*?\n)---\n", text, re.DOTALL)
    assert match, "README.md must start with a YAML block between two '---' lines"
    config = yaml.load(match.group(1), Loader=_StrictLoader)
    assert isinstance(config, dict), "the front matter must be a YAML mapping"
    return config


def _is(value, kind: str) -> bool:
    if kind == STR:
        return isinstance(value, str) and value.strip() != ""
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == STR_LIST:
        return isinstance(value, list) and all(isinstance(item, str) and item.strip() for item in value)
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def preload_entries(config: dict) -> dict[str, tuple[list[str], str | None]]:
    """``preload_from_hub`` as {repo: (files, commit)}: "repo", "repo f1,f2" or "repo f1,f2 commit" each."""
    entries = {}
    for item in config.get("preload_from_hub", []):
        repo, *rest = item.split()
        files = rest[0].split(",") if rest else []
        entries[repo] = (files, rest[1] if len(rest) > 1 else None)
    return entries


def config_problems(config: dict, gradio_pins: list[str], requires_python: str) -> list[str]:
    """What in ``config`` the reference does not allow, or disagrees with this project (empty: nothing)."""
    problems = [f"{key!r} is not a documented field ({CONFIG_REFERENCE})" for key in config if key not in DOCUMENTED]
    for key, value in config.items():
        kinds = DOCUMENTED.get(key, ())
        if kinds and not any(_is(value, kind) for kind in kinds):
            problems.append(f"{key}: {value!r} is not a {' or a '.join(kinds)}")
    if problems:
        return problems

    def allowed(key: str, choices: tuple[str, ...]) -> None:
        if key in config and config[key] not in choices:
            problems.append(f"{key}: {config[key]!r} is not one of {choices}")

    allowed("sdk", SDKS)
    allowed("colorFrom", COLORS)
    allowed("colorTo", COLORS)
    allowed("suggested_hardware", HARDWARE)
    allowed("suggested_storage", STORAGE)
    allowed("header", HEADERS)
    if any(ch.isascii() and ch.isalnum() for ch in config.get("emoji", "")):
        problems.append(f"emoji: {config['emoji']!r} is not emoji only")
    if "startup_duration_timeout" in config and not DURATION.fullmatch(config["startup_duration_timeout"]):
        problems.append(f"startup_duration_timeout: {config['startup_duration_timeout']!r} is not like 30m or 1h")
    if not config.get("base_path", "/").startswith("/"):
        problems.append(f"base_path: {config['base_path']!r} does not start with /")
    for name in config.get("custom_headers", {}):
        if name not in CUSTOM_HEADERS:
            problems.append(f"custom_headers: {name!r} is not one of {CUSTOM_HEADERS}")
    for repo, (_files, commit) in preload_entries(config).items():
        if repo.count("/") != 1 or (commit is not None and not re.fullmatch(r"[0-9a-f]{40}", commit)):
            problems.append(f"preload_from_hub: {repo!r} is not 'owner/name [file,...] [commit]'")
    # this project: the Gradio it pins, a Python it supports (and ZeroGPU runs), its app
    if config.get("sdk") != "gradio" or any(config.get("sdk_version") != pin for pin in gradio_pins):
        problems.append(f"sdk gradio, sdk_version {config.get('sdk_version')!r}: the pins say {gradio_pins}")
    python = config.get("python_version", "3.10")  # the reference's default
    if not re.fullmatch(r"3\.\d+(\.\d+)?", python) or python not in SpecifierSet(requires_python):
        problems.append(f"python_version {python!r} is not a 3.x[.y] that requires-python {requires_python} allows")
    elif ".".join(python.split(".")[:2]) not in ZEROGPU_PYTHONS:
        problems.append(f"python_version {python!r}: ZeroGPU runs {ZEROGPU_PYTHONS} only")
    if not (ROOT / config.get("app_file", "app.py")).is_file():
        problems.append(f"app_file {config.get('app_file')!r} does not exist")
    return problems


@pytest.fixture(scope="module")
def config() -> dict:
    return front_matter((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def pins(project) -> tuple[list[str], str]:
    """The Gradio version requirements.txt and pyproject.toml pin (each must pin it exactly), requires-python."""
    lines = (ROOT / "requirements.txt").read_text().splitlines() + list(project["dependencies"])
    found = [re.fullmatch(r"gradio\s*==\s*([0-9][^\s;#]*)\s*(#.*)?", line.strip()) for line in lines]
    versions = [match.group(1) for match in found if match]
    assert len(versions) == 2, f"gradio must be pinned with == in requirements.txt and in pyproject.toml: {versions}"
    return versions, project["requires-python"]


def test_front_matter_is_documented_and_agrees_with_the_pins(config, pins):
    assert config_problems(config, *pins) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"hardware": "cpu-basic"}, "not a documented field"),
        ({"python_version": 3.1}, "python_version: 3.1 is not a string"),  # what an unquoted 3.10 reads as
        ({"pinned": "false"}, "pinned: 'false' is not a boolean"),
        ({"colorTo": "orange"}, "colorTo: 'orange' is not one of"),
        ({"sdk": "streamlit"}, "sdk: 'streamlit' is not one of"),
        ({"suggested_hardware": "zero-a10g"}, "suggested_hardware: 'zero-a10g' is not one of"),
        ({"startup_duration_timeout": "30 minutes"}, "is not like 30m or 1h"),
        ({"sdk_version": "6.30.0"}, "the pins say"),
        ({"python_version": "3.9"}, "requires-python"),
        ({"python_version": "3.11"}, "ZeroGPU runs"),
        ({"app_file": "missing.py"}, "does not exist"),
        ({"preload_from_hub": ["vit_base_patch16_224 model.safetensors"]}, "preload_from_hub"),
    ],
)
def test_a_broken_front_matter_is_refused(config, pins, change, expected):
    problems = config_problems({**config, **change}, *pins)
    assert any(expected in problem for problem in problems), problems


def test_a_key_given_twice_is_refused():
    with pytest.raises(yaml.constructor.ConstructorError, match="given twice"):
        front_matter("---\nsdk: gradio\nsdk: docker\n---\n")


def test_license_is_the_projects(config, project):
    assert config["license"] == project["license"].lower()


def _hub_repo(name: str) -> str:
    import timm

    return timm.models.get_pretrained_cfg(name).hf_hub_id


def test_preload_holds_the_file_the_default_hub_backbone_loads(config, monkeypatch):
    """The Lab's backbone where the hub is reachable and a GPU present (ZeroGPU, a dedicated GPU) comes from the
    code's own rule; its weights are the first file ``imse.data.models`` looks up in the hub's default cache, at
    the repository's main branch: where an un-pinned ``preload_from_hub`` entry puts it at build time."""
    import huggingface_hub

    from imse.data import models
    from imse.data.backbones import hub_backbones
    from imse.runs.defaults import default_backbone

    backbone, _ = default_backbone(hub_reachable=True, gpu=True)
    assert backbone in hub_backbones()
    lookups = []

    def lookup(repo_id, filename, cache_dir=None, revision=None, repo_type=None):
        lookups.append((repo_id, filename, cache_dir, revision, repo_type))

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lookup)
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)  # so nothing is downloaded either
    with pytest.raises(models.BackboneUnavailable):  # nothing cached in this test: every lookup was recorded
        models.create_backbone(backbone)
    repo, filename, cache_dir, revision, repo_type = lookups[0]
    assert repo == _hub_repo(backbone)
    assert cache_dir is None and revision in (None, "main") and repo_type in (None, "model"), lookups[0]
    preloaded = preload_entries(config)
    assert repo in preloaded, f"preload_from_hub does not name {repo}"
    files, commit = preloaded[repo]
    assert filename in files, f"preload_from_hub names {files} of {repo}; the code loads {filename}"
    assert commit is None, "a pinned commit writes no refs/main, so the code's lookup at main would miss it"


def test_models_are_the_hub_backbones_offered(config):
    from imse.data.backbones import hub_backbones

    assert sorted(config["models"]) == sorted(_hub_repo(name) for name in hub_backbones())
