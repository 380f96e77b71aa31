"""Spectral codes as files: every layer's ``S`` in safetensors, with the layer names and a fingerprint of the
source weights in the header, so that a code is applied only to the model it fits (``CodeMismatchError``
otherwise, the model untouched)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from imse.core.spectral import (
    CodeMismatchError,
    SpectralLinear,
    check_code,
    code_layers,
    relative_code,
    set_code,
)

__all__ = ["load_code", "save_code"]

_CODE_FORMAT = "imse-spectral-code/1"


def _source_fingerprint(layers: Mapping[str, SpectralLinear]) -> dict[str, list[float]]:
    # Sum and maximum of S0 identify the decomposed weights well enough to refuse a code made for other weights
    # with the same architecture, and survive a change of dtype (compared with a tolerance).
    return {name: [float(layer.S0.double().sum()), float(layer.S0.double().max())] for name, layer in layers.items()}


def save_code(path: str | os.PathLike, model: nn.Module, extra: Mapping[str, str] | None = None) -> Path:
    """Save the model's spectral code as safetensors (atomically: temp file, then rename).

    The header records the layer names, a fingerprint of the source weights (``S0``) and ``extra`` strings.
    """
    from imse.core.files import save_safetensors_atomic

    layers = code_layers(model)
    if not layers:
        raise CodeMismatchError("model has no spectral layers to save")
    path = Path(path)
    metadata = {
        "format": _CODE_FORMAT,
        "layers": json.dumps(list(layers)),
        "source_fingerprint": json.dumps(_source_fingerprint(layers)),
    }
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is reserved")
        metadata[key] = str(value)
    tensors = {name: layer.S.detach().to("cpu").contiguous() for name, layer in layers.items()}
    return save_safetensors_atomic(tensors, path, metadata)


def load_code(
    path: str | os.PathLike, model: nn.Module | None = None, *, check_source: bool = True
) -> dict[str, torch.Tensor]:
    """Read a spectral code; with ``model``, check it fits and apply it (the model is untouched on failure).

    ``check_source`` also refuses a code whose fingerprint says it was adapted from other source weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        code = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for truncated/garbled files
        raise CodeMismatchError(f"{path} is not a readable safetensors spectral code: {error}") from error
    if metadata.get("format") != _CODE_FORMAT:
        raise CodeMismatchError(f"{path} is not an IMSE spectral code (format {metadata.get('format')!r})")
    order = json.loads(metadata.get("layers", "[]"))
    if sorted(order) == sorted(code):
        code = {name: code[name] for name in order}  # safetensors sorts keys; keep the model's layer order
    if model is None:
        return code
    layers = code_layers(model)
    if not layers:
        raise CodeMismatchError("model has no spectral layers; call imse.core.spectral.inject(model) first")
    code = relative_code(model, code)
    check_code(layers, code)
    if check_source and "source_fingerprint" in metadata:
        saved = relative_code(model, json.loads(metadata["source_fingerprint"]))
        current = _source_fingerprint(layers)
        differing = [
            name
            for name, (total, peak) in current.items()
            if name in saved
            and not (
                abs(saved[name][0] - total) <= 1e-3 * abs(total) and abs(saved[name][1] - peak) <= 1e-3 * abs(peak)
            )
        ]
        if differing:
            raise CodeMismatchError(
                f"{path} was adapted from other source weights ({len(differing)} layer(s) differ, "
                f"e.g. {differing[:3]}); pass check_source=False to apply it anyway"
            )
    set_code(model, code)
    return code
