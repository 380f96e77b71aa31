"""One place for the settings a run starts from: the methods' tuned hyper-parameters per backbone.

The library's ``create(name, model)`` keeps the official code's defaults (the paper's, tuned on ImageNet-C for
ViT-B/16). A run of the CLI or the Lab on a backbone whose card names a validation sweep in ``assets/results``
starts from what that sweep chose instead (``python -m imse sweep``); other backbones keep the official values.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from imse.core.methods import METHODS
from imse.core.resources import asset_path
from imse.data.backbones import BUILTIN, IMAGENET_DATA, backbone_card, backbone_data, paper_backbones

__all__ = [
    "parse_method",
    "PRESETS",
    "Preset",
    "HUB_RUN_FRACTION",
    "lab_settings",
    "method_choices",
    "method_rates",
    "run_methods",
    "tuned_settings",
]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``imse`` or ``imse@retrieval=top1:shift_threshold=0.02``: a method and its overrides (``:`` between
    them, since ``,`` separates methods on the command line; values parsed as JSON where they can be)."""
    name, _, rest = spec.partition("@")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(":")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {spec!r}; choose from {sorted(METHODS)}")
    return name, overrides


@functools.cache
def _sweep_file(name: str) -> dict:
    return json.loads(asset_path("results", name).read_text())


def _sweep(backbone: str) -> dict | None:
    """The validation sweep the backbone's card names, if any."""
    card = backbone_card(backbone)
    return _sweep_file(card.sweep) if card and card.sweep else None


def swept_values(backbone: str, method: str, setting: str) -> list[str]:
    """The values the backbone's validation sweep tried for ``method``'s ``setting`` (``[]``: none), so a page can
    say whether a default was checked or merely kept."""
    sweep = _sweep(backbone)
    stages = (sweep or {}).get("methods", {}).get(method, {}).get("stages", [])
    return [value for stage in stages if stage["setting"] == setting for value in stage["grid"]]


def tuned_settings(backbone: str, method: str) -> dict[str, Any]:
    """The settings the validation sweep chose for ``method`` on ``backbone`` (``{}``: the official defaults), and
    the files it starts from there (its card's ``start_files``).

    TENT's and SAR's learning rate comes back as ``base_lr`` (their rate at batch 64), so it keeps scaling with
    the batch size as the official code's does; IMSE's Adam rate does not scale.
    """
    card = backbone_card(backbone)
    starts = card.start_files.get(method, {}) if card else {}
    files = {key: str(asset_path(*parts)) for key, parts in starts.items()}
    sweep = _sweep(backbone)
    if sweep is None or method not in sweep["methods"]:
        return files
    entry = sweep["methods"][method]
    settings = dict(entry.get("chosen") or {"lr": entry["lr"]})
    cls = METHODS[method]
    if cls.rate_scales_with_batch():  # TENT and SAR: kept as their rate at batch 64, as the official code's
        settings["base_lr"] = cls.base_rate(settings.pop("lr"), sweep["protocol"]["batch_size"])
    return {**files, **settings}


def method_rates(method: str, lr: float) -> dict[str, float]:
    """``{"lr": lr}`` plus the method's other rates that move with it at the official ratio (its
    ``coupled_rates``: ViDA's adapters 2/5 of it), so that one number (a sweep's, ``--lr``) sets every rate."""
    defaults = METHODS[method].defaults
    rates = {"lr": lr}
    for key in METHODS[method].coupled_rates:
        rates[key] = float(f"{lr * defaults[key] / defaults['lr']:.6g}")
    return rates


# -- the Lab's runs: the method menu, the default run and the story presets -------------------------------------


def method_choices() -> dict[str, tuple[str, dict[str, Any]]]:
    """The Lab's method menu: label -> (method, settings), from the registry (each method's ``label`` and
    ``menu_variants``): IMSE's entries first, then the other adapting methods, those that do not adapt last."""
    order = sorted(METHODS.values(), key=lambda cls: (cls.name != "imse", not cls.adapts))
    choices: dict[str, tuple[str, dict[str, Any]]] = {}
    for cls in order:
        choices[cls.label] = (cls.name, {})
        choices.update({label: (cls.name, dict(settings)) for label, settings in cls.menu_variants.items()})
    return choices


@dataclass(frozen=True)
class Preset:
    """A run to look at: its settings (``LabConfig`` fields) and 2–4 sentences on what to watch."""

    title: str
    watch: str
    settings: dict[str, Any]


# The default run spans the four ImageNet-C families with the first corruption of each (noise: gaussian noise, blur:
# defocus, weather: snow, digital: contrast), long enough for adaptation to act and short enough for 2 CPU cores.
FAMILIES = ("gaussian_noise", "defocus_blur", "snow", "contrast")

PRESETS: dict[str, Preset] = {
    "default": Preset(
        title="Default run",
        watch=(
            "The first corruption of each ImageNet-C family (noise, blur, weather, digital) at severity 2, one after "
            "the other without reset. Noise and blur at this severity cost the model little; snow and contrast cost "
            "it a lot, and that is where IMSE pulls away from Source (about +3 points over the run). TENT and SAR, "
            "one click away, gain as much or more on this stream."
        ),
        settings=dict(
            scenario="continual",
            corruptions=FAMILIES,
            severity=2,
            per_domain=2500,
            methods=("IMSE", "Source"),  # with TENT ~35 % longer on 2 cores; one click away
        ),
    ),
    "collapse": Preset(
        title="Collapse",
        watch=(
            "Low contrast for 3,000 images. Plain entropy minimisation (TENT, and IMSE without its diversity loss) "
            "grows confident in a few classes: watch their most-predicted-class share climb while their accuracy "
            "falls below Source's. IMSE with L_dm keeps its answers spread and ends above Source. In the collapse "
            "panel IMSE's expert-alignment std rises above the others' (what L_dm pushes up); on this model the "
            "collapsing methods' std stays near Source's, so the prediction share is the clearer sign."
        ),
        settings=dict(
            scenario="single",
            corruptions=("contrast",),
            severity=3,
            per_domain=3000,
            methods=("IMSE", "IMSE, λ_dm = 0 (no diversity loss)", "TENT", "Source"),
        ),
    ),
    "bank": Preset(
        title="Continual shifts and the bank",
        watch=(
            "The four families twice over, with IMSE storing a spectral code whenever it detects a new domain and "
            "retrieving the nearest stored one. In the domain-bank panel, red crosses are detections, green "
            "triangles codes stored, blue ones codes retrieved. Detection finds every boundary and round 2 brings "
            "back each corruption's own code, yet plain IMSE, adapting one code throughout, ends higher."
        ),
        settings=dict(
            scenario="recurring",
            rounds=2,
            corruptions=FAMILIES,
            severity=3,
            per_domain=640,
            methods=("IMSE + retrieval (top-1)", "IMSE", "Source"),
        ),
    ),
    "gradual": Preset(
        title="Gradual drift",
        watch=(
            "Each family's corruption rises from severity 1 to 5 and falls back, 128 images a step, without reset. "
            "Every adapting method stays above Source, by less than in the default run (about 1 point): each step "
            "is a small shift, and the gains come from snow and contrast."
        ),
        settings=dict(
            scenario="gradual",
            corruptions=FAMILIES,
            per_domain=128,
            methods=("IMSE", "TENT", "SAR", "Source"),
        ),
    ),
}


# An ImageNet backbone costs ~10x the built-in model per image (ViT-B/16: 5.2 ms against 0.6 ms per image of an IMSE
# step on an H200): its runs stream a fifth of the images per domain, so the default run fits one ZeroGPU call of under
# a minute (``imse.app.zerogpu``) and every story fits the largest call a visitor without sign-in can make.
HUB_RUN_FRACTION = 5


def lab_settings(preset: str = "default", backbone: str = BUILTIN) -> dict[str, Any]:
    """The whole settings of a Lab run (``LabConfig`` fields): the default run's, the preset's on top, and IMSE's
    lr and λ_dm as tuned for ``backbone``, and the data of its card (an ImageNet backbone's domains shorter). The
    Lab's widgets, ``LabConfig``'s defaults and the CLI's ``bench`` defaults all come from here."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {str(preset)[:40]!r}; choose one of {', '.join(PRESETS)}")
    imse = {**METHODS["imse"].defaults, **tuned_settings(backbone, "imse")}
    settings: dict[str, Any] = dict(
        backbone=backbone,
        batch_size=64,
        seed=0,
        imse_lr=float(imse["lr"]),
        lambda_dm=float(imse["lambda_dm"]),
        tau=float(imse["shift_threshold"]),  # τ, the official value
        rounds=3,
        data=backbone_data(backbone),
    )
    settings.update(PRESETS["default"].settings)
    settings.update(PRESETS[preset].settings)
    if backbone_data(backbone) == IMAGENET_DATA:
        settings["per_domain"] = max(settings["batch_size"], settings["per_domain"] // HUB_RUN_FRACTION)
    return settings


# The default comparison of bench and reproduce: Source, the two entropy methods the paper builds on, and IMSE. One
# place: the CLI's help, bench's and reproduce's defaults read it (the sweep's default is every adapting method in
# the registry, ``adaptive_methods()``, so a method registered later is tuned without being named).
COMPARED = ("source", "tent", "sar", "imse")


def with_source(specs: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``specs`` with Source first when none of them is Source. Images without labels have no accuracy: what a run
    can report is each method's agreement with the unadapted model, so it must run (the Lab and bench alike)."""
    if any(name == "source" for name, _ in specs.values()):
        return specs
    return {METHODS["source"].label: ("source", {}), **specs}


def run_methods(settings: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The methods of a Lab run by label, as ``(method, overrides)``: every IMSE variant gets the run's lr, λ_dm
    and τ, under the label's own settings (so "λ_dm = 0" stays 0)."""
    methods = {}
    for label in settings["methods"]:
        name, extra = method_choices()[label]
        if name == "imse":
            base = dict(lr=settings["imse_lr"], lambda_dm=settings["lambda_dm"], shift_threshold=settings["tau"])
            extra = {**base, **extra}
        methods[label] = (name, extra)
    return methods


# -- which backbone the Lab opens with ---------------------------------------------------------------------------

PAPER_BACKBONE = paper_backbones()["supervised"].name


def default_backbone(hub_reachable: bool, gpu: bool) -> tuple[str, str]:
    """The Lab's first backbone and the note that says why. The paper's ViT-B/16 on Imagenette needs its weights
    and data from the internet once and a GPU to adapt at a watchable pace (on 2 vCPUs IMSE adapts ViT-B/16 at
    ~1 image/s); everywhere else the built-in model is the default, and hub backbones stay selectable."""
    if hub_reachable and gpu:
        return PAPER_BACKBONE, (
            "GPU and Hugging Face hub found: the Lab opens on the paper's ViT-B/16 with Imagenette (weights and "
            "data download once, then come from the cache). The built-in model stays one click away."
        )
    if not hub_reachable:
        return BUILTIN, (
            "Offline: the Lab opens on the built-in ViT (Fashion-MNIST, shipped). Hub backbones need their weights "
            "in the local Hugging Face cache."
        )
    return BUILTIN, (
        "No GPU here: the Lab opens on the built-in ViT. Hub backbones are selectable, but on a CPU IMSE adapts "
        "ViT-B/16 at about 1 image/s (2 vCPUs)."
    )
