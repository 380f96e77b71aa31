"""Property-based checks (hypothesis) that no input crashes the corruption engine or the lab's parameter checks.

Two contracts are checked on random inputs, valid and invalid mixed:

- ``corrupt(images, name, severity, generator, table)``: a valid call returns uint8 images of the input's shape,
  on its device, leaving the input untouched, with no NaN/inf in the float stage; anything else is a
  ``ValueError``/``TypeError`` with a message, never another exception (and never a result for bad input).
- ``imse.ui.make_config`` (the app's ``/start`` parameters): a ``LabConfig`` that satisfies every invariant, or a
  ``gradio.Error`` with a short, readable message — never another exception type.

Examples are derandomised (the same ones on every run) and sized to keep the file well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import gradio as gr
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import imse.data.corruptions as engine
from imse.app import ui
from imse.data.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, VALIDATION_CORRUPTIONS, corrupt
from imse.data.corruptions.tables import TABLES
from imse.data.models import BUILTIN
from imse.data.streams import SCENARIOS
from imse.runs.defaults import method_choices
from imse.runs.lab import MAX_BATCH, MAX_IMAGES, LabConfig
from imse.runs.lab_config import lab_settings_declared

METHOD_CHOICES = method_choices()  # the Lab's menu, as the app lists it

SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
MAX_SEED = 2**32 - 1

# -- The corruption engine -----------------------------------------------------------------------------------------

BAD_NAMES = st.one_of(
    st.text(max_size=20).filter(lambda s: s not in ALL_CORRUPTIONS),
    st.sampled_from(["Gaussian_Noise", "gaussian-noise", " fog", "fog ", "clean", "", "__init__", "ops"]),
    st.sampled_from([None, 3, 2.5, b"fog", ["fog"], ("fog",), {"fog": 1}]),
)
BAD_SEVERITIES = st.sampled_from(
    [0, 6, -1, 2.5, 3.0, True, False, "3", None, [3], 10**30, 10**5000, float("nan"), "x" * 10**6]
)
BAD_TABLES = st.one_of(
    st.sampled_from(["CIFAR", "imagenet-c", "tiny", 5, ["cifar"], {"cifar": 1}]), st.text(max_size=8)
)


def _valid(draw, options, invalid, p_valid=0.85):
    """A valid value with probability ``p_valid``, else an invalid one (each drawn from its strategy)."""
    if draw(st.floats(0, 1)) < p_valid:
        return draw(options), True
    return draw(invalid), False


@st.composite
def engine_calls(draw, p_valid=0.85):
    """Arguments of one ``corrupt`` call and whether the documented rules make it valid (``p_valid=1``: only
    valid calls)."""
    some_bad = p_valid < 1  # the choices below that are invalid only appear then
    name, name_ok = _valid(draw, st.sampled_from(ALL_CORRUPTIONS), BAD_NAMES, p_valid)
    severity, severity_ok = _valid(draw, st.integers(1, 5), BAD_SEVERITIES, p_valid)
    table_choice = draw(st.sampled_from(["auto", "auto", "cifar", "imagenet"] + ["bad"] * some_bad))
    if table_choice == "auto":
        table, table_ok = draw(st.sampled_from([None, ""])), True  # both mean: chosen by the image size
    elif table_choice == "bad":
        table, table_ok = draw(BAD_TABLES.filter(lambda t: t and (not isinstance(t, str) or t not in TABLES))), False
    else:
        table, table_ok = table_choice, True
    batch = draw(st.integers(0, 3))
    # tiny, odd, non-square; large sides stay <= 80 px (glass_blur's sweep and elastic's filters are per pixel)
    height, width = draw(st.integers(2 - some_bad, 80)), draw(st.integers(2 - some_bad, 80))
    dtype, dtype_ok = _valid(
        draw, st.just(torch.uint8), st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]), p_valid
    )
    channels, channels_ok = _valid(draw, st.just(3), st.sampled_from([1, 4]), p_valid)
    ndim = draw(st.sampled_from([4] * 8 + [3, 5] * some_bad))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "strided"] + ["sparse"] * some_bad))
    fill = draw(st.sampled_from(["random", "random", "zeros", "full", "checker"]))
    device = draw(st.sampled_from(DEVICES * 4 + ["meta"] * some_bad))  # a meta tensor has no data: refused
    if layout == "sparse":
        device = "cpu"
    generator = draw(st.sampled_from(["none", "seeded", "seeded"] + ["bad"] * some_bad))
    as_tensor = draw(st.sampled_from([True] * 19 + [False] * some_bad))

    shape = (batch, channels, height, width)
    if ndim == 3:
        shape = shape[1:]
    elif ndim == 5:
        shape = (1, *shape)
    source = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if fill == "random":
        images = torch.randint(0, 256, shape, generator=source, dtype=torch.uint8)
    elif fill == "checker":
        images = ((torch.arange(height)[:, None] + torch.arange(width)[None]) % 2 * 255).to(torch.uint8)
        images = images.expand(shape).clone()
    else:
        images = torch.full(shape, 0 if fill == "zeros" else 255, dtype=torch.uint8)
    images = images.to(dtype)
    if layout == "channels_last" and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view: every other column of an image twice as wide
        wide = torch.cat((images, images), dim=-1)
        images = wide[..., ::2]
    elif layout == "sparse":
        images = images.to_sparse()
    images = images.to(device)
    if generator == "none":
        rng, rng_ok = None, True
    elif generator == "seeded":
        rng, rng_ok = torch.Generator().manual_seed(draw(st.integers(0, 2**31))), True
    else:
        rng, rng_ok = draw(st.sampled_from([5, "seed", torch.tensor(1)])), False
    if not as_tensor:  # nested lists of the same numbers
        images = torch.zeros(shape, dtype=torch.uint8).tolist()

    valid = (
        name_ok
        and severity_ok
        and table_ok
        and rng_ok
        and as_tensor
        and dtype_ok
        and channels_ok
        and ndim == 4
        and layout != "sparse"
        and device != "meta"
        and height >= 2
        and width >= 2
    )
    return {"images": images, "name": name, "severity": severity, "generator": rng, "table": table}, valid


def _checked(function):
    """The engine's corruption function with a check that its float stage never yields NaN or inf (the uint8
    cast would hide them: NaN becomes an arbitrary grey level)."""

    def wrapper(x, params, draws, table):
        out = function(x, params, draws, table)
        if out.is_floating_point():
            assert torch.isfinite(out).all(), f"{function.__name__} produced NaN/inf"
        return out

    wrapper.works_on_uint8 = getattr(function, "works_on_uint8", False)
    wrapper.__name__ = function.__name__
    return wrapper


# the registry with every corruption's function checked for NaN/inf (the public registry, patched for the test)
CHECKED = {name: dataclasses.replace(c, function=_checked(c.function)) for name, c in engine.REGISTRY.items()}


def _check_engine_call(call: dict, valid: bool) -> None:
    images = call["images"]
    before = images.clone() if isinstance(images, torch.Tensor) and not images.is_meta else None
    try:
        with mock.patch.dict(engine.REGISTRY, CHECKED):
            out = corrupt(**call)
    except (ValueError, TypeError) as error:
        assert not valid, f"a valid call was refused: {error}"
        assert str(error).strip(), "an error without a message"
        assert len(str(error)) < 500
        return
    assert valid, "an invalid call was accepted"
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.uint8
    assert out.shape == images.shape
    assert out.device == images.device
    assert torch.equal(images, before), "the input was modified"
    if images.shape[0] and images.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        pytest.fail("the output shares the input's memory")


@settings(max_examples=300, **SETTINGS)
@given(engine_calls())
def test_corrupt_returns_uint8_of_the_input_shape_or_raises_a_clear_error(case):
    call, valid = case
    _check_engine_call(call, valid)


@settings(max_examples=150, **SETTINGS)
@given(engine_calls(p_valid=1.0))
def test_corrupt_accepts_every_valid_call(case):
    """Valid calls only (the mixed test spends most examples on refusals): names × severities × sizes × tables ×
    layouts × generators."""
    call, valid = case
    _check_engine_call(call, valid)


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
@pytest.mark.parametrize(("height", "width"), [(2, 2), (2, 9), (9, 2), (3, 3), (2, 85), (85, 2)])
@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_every_corruption_handles_the_smallest_and_thinnest_images(name, height, width, table):
    """The documented minimum (2×2) and thin strips, at every severity, with both parameter tables."""
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for severity in range(1, 6):
        _check_engine_call(
            {"images": images, "name": name, "severity": severity, "generator": None, "table": table}, valid=True
        )


# -- The app's run parameters (``ui.make_config``) -----------------------------------------------------------------

BACKBONES = [value for _, value in ui.backbone_choices()]


def _parses(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


NAN, INF = float("nan"), float("inf")
# Anything the JSON API can send that is none of the widget's values.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "NaN", "-inf", "1e999", "0x10", "1_000", "3.0", "  4 ", "five", "\x00"]),
    st.lists(st.integers(0, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)
HUGE = st.integers(-(10**300), 10**300)
ENORMOUS = st.sampled_from([10**400, -(10**400), 10**5000])  # beyond float, and beyond int's 4300-digit str limit


def whole_numbers(low: int, high: int):
    valid = st.one_of(st.integers(low, high), st.integers(low, high).map(float), st.integers(low, high).map(str))
    invalid = st.one_of(
        st.integers(low - 10**6, low - 1),
        st.integers(high + 1, high + 10**6),
        HUGE,
        ENORMOUS,
        st.floats(low - 1, high + 1).filter(lambda f: f != int(f)),
        st.floats(allow_nan=True, allow_infinity=True),
        JUNK,
        st.sampled_from([NAN, INF, -INF, "inf", "1e999", -0.5, 2.5, "2.5", "abc", [3], {"v": 3}]),
    )
    return valid, invalid


def real_numbers(low: float, high: float, open_low: bool):
    valid = st.one_of(st.floats(low, high, exclude_min=open_low), st.just(high))
    invalid = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        HUGE,
        ENORMOUS,
        st.sampled_from([NAN, INF, -INF, -1e-9, 0.0, high * 2, -high]),
        st.sampled_from(["abc", "nan", "inf", "1e-3", "", None, [1e-3], {"lr": 1}]),
        JUNK,
    )
    return valid, invalid


BACKBONE = (
    st.one_of(st.sampled_from(BACKBONES), st.sampled_from([None, "", BUILTIN])),
    st.sampled_from(
        [
            "/etc/passwd",
            "../x",
            "../../assets/builtin/model.safetensors",
            "vit_large_patch16_224",  # a real timm name, but not offered
            "vit_tiny_patch16_224",  # an offered one without its weight tag
            "https://example.com/model.safetensors",
            "builtin ",
            "BUILTIN",
            "hf-hub:timm/vit_tiny_patch16_224",
            "C:\\model.pth",
        ]
    )
    | JUNK,
)
SCENARIO = (st.sampled_from(SCENARIOS), st.sampled_from(["Continual", "random", "", None]) | JUNK)
CORRUPTION_LISTS = (
    st.one_of(
        st.lists(st.sampled_from(ALL_CORRUPTIONS), min_size=1, max_size=6),
        st.sampled_from(["test", "validation", "fog", "gaussian_noise"]),
        st.lists(st.sampled_from(ALL_CORRUPTIONS), min_size=1, max_size=3).map(tuple),
    ),
    st.just([])
    | st.lists(st.one_of(st.sampled_from(ALL_CORRUPTIONS), st.text(max_size=10)), min_size=1, max_size=4)
    | st.lists(st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.just({})), max_size=3)
    | st.sampled_from(["clean", "unknown", "", None, 5, 2.5, True])
    | st.lists(st.text(min_size=30, max_size=60), min_size=20, max_size=40),  # a long message must stay short
)
METHOD_LISTS = (
    st.lists(st.sampled_from(list(METHOD_CHOICES)), min_size=1, max_size=4, unique=True),
    st.lists(st.sampled_from(list(METHOD_CHOICES)), min_size=2, max_size=4)  # duplicates likely
    | st.just([])
    | st.lists(st.one_of(st.sampled_from(list(METHOD_CHOICES)), st.text(max_size=10)), min_size=1, max_size=3)
    | st.lists(st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.just({})), max_size=3)
    | st.sampled_from(["IMSE", "imse", None, 5, 2.5, True, {"IMSE": 1}, ("IMSE",)]),
)
DEVICE = (
    st.sampled_from(ui.device_choices()),
    st.sampled_from(["cuda", "cuda:0", "cuda:7", "meta", "mps", "CPU", "cpu ", "", "cpu:0", None, 0]) | JUNK,
)
DECLARED = lab_settings_declared()  # each setting's kind, limits and choices, as LabConfig declares them


def declared_numbers(name: str):
    """(valid, invalid) strategies for a whole-number or real setting, at its declared limits."""
    setting = DECLARED[name]
    if setting.kind == "whole":
        # images per domain: valid up to 5,000, where most runs stay within the image limit (beyond, "limit")
        return whole_numbers(int(setting.low), min(int(setting.high), 5000 if name == "per_domain" else 2**63))
    return real_numbers(setting.low, setting.high, setting.open_low)


# (valid, invalid) strategies per parameter, in make_config's order
CASES = {
    "backbone": BACKBONE,
    "scenario": SCENARIO,
    "corruptions": CORRUPTION_LISTS,
    **{name: declared_numbers(name) for name in ("severity",)},
    "methods": METHOD_LISTS,
    **{name: declared_numbers(name) for name in ("batch_size", "per_domain", "seed", "imse_lr", "lambda_dm", "tau")},
    "rounds": declared_numbers("rounds"),
    "device": DEVICE,
}


def weighted(valid, invalid, invalid_in_ten: int):
    """``invalid`` about ``invalid_in_ten`` times in ten (``one_of`` is far from uniform once a small valid set,
    such as the one device, has been tried); shrinks towards the valid value."""
    return st.integers(0, 9).flatmap(lambda k: invalid if k >= 10 - invalid_in_ten else valid)


# Valid about nine times in ten: with twelve parameters, enough examples get past the checks to test the
# configs that come out (and which single invalid value slips through).
PARAMETERS = {name: weighted(valid, invalid, 1) for name, (valid, invalid) in CASES.items()}
# Invalid about seven times in ten: the single-fault test's one changed parameter.
FAULTS = {name: weighted(valid, invalid, 7) for name, (valid, invalid) in CASES.items()}
VALID = {
    "backbone": st.sampled_from(BACKBONES),
    "scenario": st.sampled_from(SCENARIOS),
    "corruptions": st.one_of(
        st.lists(st.sampled_from(ALL_CORRUPTIONS), min_size=1, max_size=6), st.sampled_from(["test", "validation"])
    ),
    "severity": st.one_of(st.integers(1, 5), st.integers(1, 5).map(float)),
    "methods": st.lists(st.sampled_from(list(METHOD_CHOICES)), min_size=1, max_size=6, unique=True),
    "batch_size": st.integers(1, MAX_BATCH),
    "per_domain": st.integers(1, 1000),
    "seed": st.integers(0, MAX_SEED),
    "imse_lr": st.floats(1e-8, 1.0),
    "lambda_dm": st.floats(0.0, 1000.0),
    "tau": st.floats(1e-6, 10.0),
    "rounds": st.integers(1, 10),
    "device": st.sampled_from(ui.device_choices()),
}
ORDER = tuple(PARAMETERS)
# Words an error about each parameter names it by.
LABELS = {
    "backbone": "backbone",
    "scenario": "scenario",
    "corruptions": "corruption",
    "severity": "severity",
    "methods": "method",
    "batch_size": "batch size",
    "per_domain": "image",
    "seed": "seed",
    "imse_lr": "lr",
    "lambda_dm": "λ_dm",
    "tau": "τ",
    "rounds": "rounds",
    "device": "device",
}
# What users must never read: Python internals instead of a sentence about their input.
INTERNALS = ("Traceback", " object at 0x", "unhashable", "not iterable", "NoneType", "argument must be", "<class ")


def _readable(error: gr.Error) -> str:
    message = str(error.message if hasattr(error, "message") else error)
    assert message.strip(), "an empty error message"
    assert len(message) <= 1000, f"a {len(message)}-character message"
    return message


def _check_config(config: LabConfig, values: dict, from_app: bool = True) -> None:
    """Every invariant a started run relies on. ``make_config`` hands on tuples and floats; ``validate`` on its
    own also passes lists and whole-number reals."""
    sequences, reals = ((tuple,), (float,)) if from_app else ((tuple, list), (int, float))
    assert isinstance(config, LabConfig)
    assert config.backbone in BACKBONES
    assert config.data == (BUILTIN if config.backbone == BUILTIN else "imagenette")
    assert config.scenario in SCENARIOS
    assert isinstance(config.corruptions, sequences) and config.corruptions
    assert all(isinstance(c, str) and c in ALL_CORRUPTIONS for c in config.corruptions)
    for name, setting in DECLARED.items():  # every setting within its declaration
        value = getattr(config, name)
        if setting.kind == "whole":
            assert type(value) is int and setting.low <= value <= setting.high, (name, value)
        elif setting.kind == "number":
            assert type(value) in reals and math.isfinite(value), (name, value)
            above = setting.low < value if setting.open_low else setting.low <= value
            assert above and value <= setting.high, (name, value)
        elif setting.kind == "choice":
            assert value in setting.choices(), (name, value)
        else:
            assert isinstance(value, sequences) and value and all(v in setting.choices() for v in value), (name, value)
            assert not setting.unique or len(set(value)) == len(value), (name, value)
    assert config.device in ui.device_choices()
    domains = len(config.corruptions) * (9 if config.scenario == "gradual" else 1)
    domains *= config.rounds if config.scenario == "recurring" else 1
    assert domains * config.per_domain <= MAX_IMAGES
    if isinstance(values["corruptions"], list) and values["corruptions"]:
        assert config.corruptions == tuple(values["corruptions"])


def _make(values: dict):
    return ui.make_config(**{name: values[name] for name in ORDER})


@settings(max_examples=600, **SETTINGS)
@given(st.fixed_dictionaries(PARAMETERS))
def test_make_config_returns_a_valid_config_or_a_readable_gradio_error(values):
    try:
        config = _make(values)
    except gr.Error as error:
        assert type(error) is gr.Error
        message = _readable(error)
        assert not any(text in message for text in INTERNALS[:2]), message
        event("refused")
        return
    event("accepted")
    _check_config(config, values)


@settings(max_examples=200, **SETTINGS)
@given(st.fixed_dictionaries(VALID))
def test_make_config_accepts_every_valid_combination_within_the_image_limit(values):
    domains = len(CORRUPTIONS if values["corruptions"] == "test" else VALIDATION_CORRUPTIONS)
    if isinstance(values["corruptions"], list):
        domains = len(values["corruptions"])
    domains *= {"gradual": 9, "recurring": values["rounds"]}.get(values["scenario"], 1)
    if domains * values["per_domain"] > MAX_IMAGES:
        with pytest.raises(gr.Error, match="limit"):
            _make(values)
        return
    config = _make(values)
    _check_config(config, values)
    assert config.severity == int(values["severity"]) and config.seed == values["seed"]
    assert config.methods == tuple(values["methods"]) and config.device == values["device"]
    assert (config.imse_lr, config.lambda_dm, config.tau) == (values["imse_lr"], values["lambda_dm"], values["tau"])
    groups = {"test": CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS}
    chosen = values["corruptions"]
    assert config.corruptions == (groups[chosen] if isinstance(chosen, str) else tuple(chosen))


DEFAULTS = {
    "backbone": BUILTIN,
    "scenario": "continual",
    "corruptions": ["fog", "contrast"],
    "severity": 5,
    "methods": ["IMSE", "Source"],
    "batch_size": 64,
    "per_domain": 500,
    "seed": 0,
    "imse_lr": 7e-4,
    "lambda_dm": 50.0,
    "tau": 0.05,
    "rounds": 3,
    "device": "cpu",
}


@st.composite
def single_faults(draw):
    name = draw(st.sampled_from(ORDER))
    value = draw(FAULTS[name])
    return name, value


@settings(max_examples=400, **SETTINGS)
@given(single_faults())
def test_a_single_bad_parameter_is_named_in_the_message(case):
    """One parameter changed from a valid configuration: accepted, or refused with a message naming it and
    free of Python internals."""
    name, value = case
    try:
        config = _make({**DEFAULTS, name: value})
    except gr.Error as error:
        message = _readable(error)
        assert LABELS[name] in message, f"{name}={value!r}: {message}"
        assert not any(text in message for text in INTERNALS), f"{name}={value!r}: {message}"
        return
    _check_config(config, {**DEFAULTS, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("backbone", "/etc/passwd"),
        ("backbone", "../x"),
        ("backbone", "vit_large_patch16_224"),
        ("scenario", ["continual"]),
        ("corruptions", [None]),
        ("corruptions", [["fog"]]),
        ("methods", [["IMSE"]]),
        ("methods", ["IMSE", "IMSE"]),
        ("seed", -1),
        pytest.param("seed", 2**64, id="seed-2**64"),
        ("device", "cuda:7"),
        ("device", "meta"),
        ("device", ["cpu"]),
    ]
    + ([] if torch.cuda.is_available() else [("device", "cuda")]),
)
def test_known_bad_values_are_refused_by_name(name, value):
    with pytest.raises(gr.Error) as raised:
        _make({**DEFAULTS, name: value})
    message = _readable(raised.value)
    assert LABELS[name] in message and not any(text in message for text in INTERNALS), message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("severity", INF),
        ("batch_size", -INF),
        ("seed", "1e999"),
        pytest.param("per_domain", 10**400, id="per_domain-1e400"),
        # beyond int's 4300-digit str limit: no f"{n:,}" (nor pytest's test id) may format it
        pytest.param("per_domain", 10**5000, id="per_domain-1e5000"),
        ("severity", NAN),
    ],
)
def test_infinite_and_enormous_whole_numbers_are_refused_by_name(name, value):
    with pytest.raises(gr.Error, match=LABELS[name]):
        _make({**DEFAULTS, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("imse_lr", 10**400, id="imse_lr-1e400"),  # float(10**400): OverflowError, not caught
        pytest.param("tau", -(10**400), id="tau-minus-1e400"),
        ("corruptions", {"fog": 1}),  # names.get(dict): TypeError before the try
        ("corruptions", {"fog"}),
    ],
)
def test_enormous_reals_and_unhashable_corruptions_become_gradio_errors(name, value):
    with pytest.raises(gr.Error):
        _make({**DEFAULTS, name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("imse_lr", None),  # "float() argument must be a string or a real number, not 'NoneType'"
        ("tau", "abc"),  # "could not convert string to float: 'abc'"
        ("lambda_dm", [1.0]),
        ("methods", 5),  # "'int' object is not iterable"
    ],
)
def test_messages_worded_by_ui_name_the_parameter(name, value):
    with pytest.raises(gr.Error) as raised:
        _make({**DEFAULTS, name: value})
    message = _readable(raised.value)
    assert LABELS[name] in message and not any(text in message for text in INTERNALS), message


def test_a_boolean_is_not_a_number():
    """``True`` is not severity 1 (nor a batch size, a seed, an lr): ``float(True)`` is 1.0."""
    for name in ("severity", "batch_size", "seed", "imse_lr"):
        try:
            _make({**DEFAULTS, name: True})
        except gr.Error:
            continue
        raise AssertionError(f"{name}=True was accepted")


def test_one_method_as_a_string_is_that_method():
    """``"IMSE"`` (one label, as ``corruptions`` takes one name) is not split into the letters I, M, S, E."""
    try:
        config = _make({**DEFAULTS, "methods": "IMSE"})
    except gr.Error as error:
        raise AssertionError(str(error)) from None
    assert config.methods == ("IMSE",)


# -- ``imse.lab.validate`` on its own (the CLI, perf and run_lab build LabConfigs without the app's coercion) -----

ANYTHING = st.one_of(
    JUNK,
    st.integers(),
    ENORMOUS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.tuples(st.one_of(st.text(max_size=5), st.integers(), st.none())),
    st.sampled_from([(), [], ("fog",), ("IMSE", "Source"), ("IMSE", "IMSE"), 1 + 2j, b"cpu", object()]),
)
RAW_FIELDS = {
    "backbone": st.one_of(st.sampled_from(BACKBONES), ANYTHING),
    "scenario": st.one_of(st.sampled_from(SCENARIOS), ANYTHING),
    "corruptions": st.one_of(
        st.lists(st.sampled_from(ALL_CORRUPTIONS), min_size=1, max_size=4).map(tuple),
        st.lists(st.sampled_from(ALL_CORRUPTIONS), min_size=1, max_size=4),
        ANYTHING,
    ),
    "severity": st.one_of(st.integers(0, 6), ANYTHING),
    "methods": st.one_of(
        st.lists(st.sampled_from(list(METHOD_CHOICES)), min_size=1, max_size=3).map(tuple),
        st.lists(st.sampled_from(list(METHOD_CHOICES)), min_size=1, max_size=3),
        ANYTHING,
    ),
    "batch_size": st.one_of(st.integers(0, MAX_BATCH + 1), ANYTHING),
    "per_domain": st.one_of(st.integers(0, 10**6), ANYTHING),
    "seed": st.one_of(st.integers(-1, MAX_SEED + 1), ANYTHING),
    "imse_lr": st.one_of(st.floats(0, 1.5), ANYTHING),
    "lambda_dm": st.one_of(st.floats(-1, 1001), ANYTHING),
    "tau": st.one_of(st.floats(0, 11), ANYTHING),
    "device": st.one_of(st.sampled_from(["cpu", "cuda", "cuda:0", "meta"]), ANYTHING),
    "rounds": st.one_of(st.integers(0, 11), ANYTHING),
    "data": st.one_of(st.sampled_from(["builtin", "imagenette", "/data/folder"]), ANYTHING),
}


@settings(max_examples=400, **SETTINGS)
@given(st.fixed_dictionaries({}, optional=RAW_FIELDS), st.one_of(st.none(), st.integers(1, 10_000)))
def test_validate_returns_the_config_or_raises_a_readable_value_error(fields, source_size):
    from imse.runs.lab import validate

    config = LabConfig(**fields)
    try:
        result = validate(config, source_size)
    except ValueError as error:
        assert type(error) is ValueError
        message = str(error)
        assert message.strip() and len(message) <= 1000, message
        assert not any(text in message for text in INTERNALS), message
        return
    assert result is config
    _check_config(config, {"corruptions": None}, from_app=False)
    if source_size is not None:
        assert config.per_domain <= source_size


@pytest.mark.parametrize("name", [name for name, s in DECLARED.items() if s.kind in ("whole", "number")])
def test_each_number_setting_is_accepted_at_its_declared_limits_and_refused_just_outside(name):
    """Whatever LabConfig declares is what make_config enforces: the limits themselves pass (an open lower limit
    just above it), one step beyond either is refused with a message that names the setting as declared."""
    setting = DECLARED[name]
    step = 1 if setting.kind == "whole" else 1e-9
    low = setting.low + step if setting.open_low else setting.low
    base = {**DEFAULTS, "per_domain": 1, "corruptions": ["fog"], "scenario": "single"}  # far from the image limit
    for value in (low, setting.high):
        value = int(value) if setting.kind == "whole" else value
        assert getattr(_make({**base, name: value}), name) == value
    for value in (setting.low - step if not setting.open_low else setting.low, setting.high + step):
        with pytest.raises(gr.Error, match=setting.said):
            _make({**base, name: int(value) if setting.kind == "whole" else value})
