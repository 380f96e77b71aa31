"""Glue between Gradio events and the library: turn widget values into calls, results into panel values.

Every failure a user can cause becomes a ``gr.Error`` with a readable message (never a traceback in the page);
the logic stays in ``imse.lab``, ``imse.teach`` and ``imse.viz``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import gradio as gr
import torch

from . import teach, viz
from .data.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS
from .lab import METHOD_CHOICES, LabConfig, export_run, run_lab, summary_rows, validate
from .models import BUILTIN, HUB_BACKBONES, BackboneUnavailable
from .spectral import spectral_layers

__all__ = ["backbone_choices", "start_lab", "teach_layer", "teach_predict"]

PANEL_TITLES = ("Online accuracy", "Expert alignment std", "Singular-value shifts", "Domain bank", "The current batch")
_EXPORT_DIR = tempfile.mkdtemp(prefix="imse-lab-")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def backbone_choices() -> list[tuple[str, str]]:
    """The built-in backbone first; hub models with a note (they download weights when chosen)."""
    note = " — offline: needs its weights in the local cache" if offline() else " — downloads weights when started"
    return [("built-in ViT (Fashion-MNIST, offline)", BUILTIN)] + [
        (f"{label}{note}", name) for name, label in HUB_BACKBONES.items()
    ]


def device_choices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def empty_panels() -> tuple:
    return tuple(viz.empty_figure(title) for title in PANEL_TITLES)


def _as_int(value: Any, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a whole number") from None
    if number != int(number):
        raise gr.Error(f"{name} must be a whole number")
    return int(number)


def make_config(
    backbone, scenario, corruptions, severity, methods, batch_size, per_domain, seed, imse_lr, lambda_dm, tau, device
) -> LabConfig:
    names = {"test": CORRUPTIONS, "validation": VALIDATION_CORRUPTIONS}
    chosen = tuple(corruptions) if isinstance(corruptions, (list, tuple)) else names.get(corruptions, (corruptions,))
    try:
        config = LabConfig(
            backbone=backbone or BUILTIN,
            scenario=scenario,
            corruptions=chosen,
            severity=_as_int(severity, "severity"),
            methods=tuple(methods or ()),
            batch_size=_as_int(batch_size, "batch size"),
            per_domain=_as_int(per_domain, "images per domain"),
            seed=_as_int(seed, "seed"),
            imse_lr=float(imse_lr),
            lambda_dm=float(lambda_dm),
            tau=float(tau),
            device=device,
            data=BUILTIN if (backbone or BUILTIN) == BUILTIN else "imagenette",
        )
        return validate(config)
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error)) from None


def panels(state, show_source: bool) -> tuple:
    return (
        viz.accuracy_figure(state),
        viz.alignment_figure(state, show_source),
        viz.shift_figure(state),
        viz.bank_figure(state),
        viz.batch_figure(state),
    )


def start_lab(
    backbone,
    scenario,
    corruptions,
    severity,
    methods,
    batch_size,
    per_domain,
    seed,
    imse_lr,
    lambda_dm,
    tau,
    device,
    show_source,
) -> Iterator[tuple]:
    """Stream a run: (status, 5 figures, results table, download) at most ~4 times a second."""
    config = make_config(
        backbone,
        scenario,
        corruptions,
        severity,
        methods,
        batch_size,
        per_domain,
        seed,
        imse_lr,
        lambda_dm,
        tau,
        device,
    )
    table = gr.update()
    try:
        for state in run_lab(config, min_interval=0.5):
            status = (
                f"**{state.message or 'running'}** — batch {state.batch}/{state.total_batches}, "
                f"{state.images:,} images, {state.seconds:.1f} s"
            )
            if state.finished:
                headers, rows = summary_rows(state)
                table = gr.update(value=rows, headers=headers)
                archive = export_run(state, _EXPORT_DIR)
                yield (status, *panels(state, show_source), table, str(archive))
            else:
                yield (status, *panels(state, show_source), table, None)
    except (ValueError, BackboneUnavailable, RuntimeError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from None


# -- Teach tab ---------------------------------------------------------------------------------------------------


def teach_layers(backbone: str = BUILTIN) -> list[str]:
    return list(spectral_layers(teach.spectral_backbone(backbone)))


def teach_backbone(backbone_name: str):
    """Switching backbones: its layers and its experts' range (hub models load their weights here)."""
    try:
        backbone = teach.spectral_backbone(backbone_name)
    except (BackboneUnavailable, ValueError, RuntimeError) as error:
        raise gr.Error(str(error)) from None
    layers = spectral_layers(backbone)
    first = next(iter(layers))
    return gr.update(choices=list(layers), value=first), gr.update(maximum=layers[first].rank - 1, value=0)


def _image(backbone_name: str, sample: str | None, upload: str | None) -> tuple[torch.Tensor, str]:
    backbone = teach.spectral_backbone(backbone_name)
    if upload:
        try:
            return teach.load_user_image(upload, backbone.input_size), "your image"
        except ValueError as error:
            raise gr.Error(str(error)) from None
    samples = teach.sample_images()
    labels = [label for _, label in samples]
    image, label = samples[labels.index(sample) if sample in labels else 0]
    if image.shape[-1] != backbone.input_size:  # bundled 32 px samples shown to a 224 px backbone
        resized = torch.nn.functional.interpolate(image[None].float(), size=backbone.input_size, mode="bilinear")
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    return image, label


def teach_layer(backbone_name: str, layer: str, sample: str | None, upload: str | None, expert: float):
    """Spectrum and orthogonality check for a layer, on the chosen image."""
    try:
        backbone = teach.spectral_backbone(backbone_name)
    except (BackboneUnavailable, ValueError) as error:
        raise gr.Error(str(error)) from None
    layers = spectral_layers(backbone)
    if layer not in layers:
        raise gr.Error(f"unknown layer {layer!r}")
    image, _ = _image(backbone_name, sample, upload)
    expert = int(expert)
    spectrum = layers[layer].S.detach().tolist()
    cosines = teach.expert_cosines(backbone, layer, image)
    return viz.spectrum_figure(spectrum, layer, expert), viz.orthogonality_figure(cosines, layer)


def teach_predict(backbone_name: str, layer: str, sample: str | None, upload: str | None, expert: float, scale: float):
    """Top-5 with and without scaling one expert's σ."""
    backbone = teach.spectral_backbone(backbone_name)
    layers = spectral_layers(backbone)
    if layer not in layers:
        raise gr.Error(f"unknown layer {layer!r}")
    expert = int(expert)
    if not 0 <= expert < layers[layer].rank:
        raise gr.Error(f"expert must be 0 to {layers[layer].rank - 1}")
    image, label = _image(backbone_name, sample, upload)
    names = backbone.class_names
    base = teach.predict(backbone, image)
    scaled = teach.predict(backbone, image, layer, expert, float(scale))
    best_base, best_scaled = (
        max(range(len(base)), key=base.__getitem__),
        max(range(len(scaled)), key=scaled.__getitem__),
    )
    text = (
        f"**{label}** — unchanged model: **{names[best_base]}** ({100 * base[best_base]:.1f} %); "
        f"with σ_{expert} of `{layer}` × {scale:g}: **{names[best_scaled]}** ({100 * scaled[best_scaled]:.1f} %)"
    )
    preview = image.permute(1, 2, 0).numpy()
    return (
        text,
        viz.top5_figure(base, names, "top-5, unchanged"),
        viz.top5_figure(scaled, names, f"top-5, σ_{expert} × {scale:g}"),
        preview,
    )


def method_labels() -> list[str]:
    return list(METHOD_CHOICES)
