"""Every method's adaptation step against IMSE's, on the same batch: what a baseline costs per step and how many
values it adapts (issue 18: ViDA's and DPAL's cost beside IMSE's; the paper's "1/385 of ViDA's parameters").
Source's call (one forward) is timed beside them: what a run's cost estimate (``imse.app.run_cost``) needs of it."""

from __future__ import annotations

import torch

from imse.core.methods import METHODS, create
from imse.core.spectral import find_vit
from imse.data.backbones import SHIPPED, backbone_card
from imse.data.models import create_backbone
from imse.perf.timing import _time_interleaved, _vit, check


def _model(name: str, device: torch.device) -> torch.nn.Module:
    """A shipped backbone (its own weights) or a random-init timm ViT (or a smoke stand-in)."""
    card = backbone_card(name)
    if card is not None and card.weights == SHIPPED:
        return create_backbone(name).to(device)
    return _vit(name, device)


def bench_methods(device: torch.device, batch: int, repeats: int, model_name: str, precision: str = "fp32") -> dict:
    """Seconds per call of each registered method (Source's forward and every adaptation step), timed interleaved
    with IMSE's on one batch of images at the model's input size, in ``precision``, and trainable values.

    ``margin = 1.0`` (``E0 = ln C``) for the methods that filter by entropy: a random-init ViT predicts
    near-uniformly and would otherwise skip every update. ViDA's trainable values are every ViT weight plus its
    adapters (the official code trains both); its adapters alone are reported beside them.
    """
    methods = {}
    for name in METHODS:  # every registered method, Source included
        model = _model(model_name, device)
        settings = {"precision": precision, **({"margin": 1.0} if "margin" in METHODS[name].defaults else {})}
        if "batch_size" in METHODS[name].defaults:
            settings["batch_size"] = batch
        methods[name] = create(name, model, **settings)
    height, width = find_vit(model)[1].patch_embed.img_size
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = _time_interleaved({name: lambda m=method: m(x) for name, method in methods.items()}, repeats, 1, device)
    trainable = {name: method.num_trainable() for name, method in methods.items()}
    label = f"{model_name}, b{batch}" + ("" if precision == "fp32" else f", {precision}")
    rows = [
        check(
            f"{name} step / IMSE step ({label})",
            f"{seconds[name] * 1e3:.1f} / {seconds['imse'] * 1e3:.1f} ms",
            f"{seconds[name] / seconds['imse']:.2f}",
            "reported",
            None,
        )  # fmt: skip
        for name in methods
        if name != "imse"
    ]
    rows += [
        check(
            f"{name} trainable / IMSE's ({label})",
            f"{trainable[name]:,} / {trainable['imse']:,}",
            f"{trainable[name] / trainable['imse']:.0f}",
            "reported",
            None,
        )  # fmt: skip
        for name in methods
        if trainable[name] > trainable["imse"]
    ]
    adapters = methods["vida"].num_adapter_values() if "vida" in methods else None
    if adapters is not None:  # the paper's comparison counts ViDA's adapters alone
        rows.append(check(f"ViDA adapters / IMSE's ({label})", f"{adapters:,} / {trainable['imse']:,}",
                          f"{adapters / trainable['imse']:.0f}", "paper: 385", None))  # fmt: skip
    return {
        "model": model_name,
        "batch": batch,
        "precision": precision,
        "step_s": seconds,
        "step_ratio_to_imse": {name: seconds[name] / seconds["imse"] for name in methods},
        "trainable": trainable,
        "vida_adapter_values": adapters,
        "updated": {name: bool(method.last_record["updated"]) for name, method in methods.items()},
        "checks": rows,
    }
