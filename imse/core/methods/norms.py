"""Which normalisation layers a method adapts: TENT every LayerNorm, SAR and DPAL those below their frozen top.

The question has more than one answer on the paper's other backbones: CLIP's ViT normalises its tokens before the
blocks (timm's ``norm_pre``) and MAE's pools its patches and normalises the average (``fc_norm``, its ``norm`` being
an identity). docs/protocol.md ("SAR and DPAL's LayerNorms") gives each protocol's answer and why.
"""

from __future__ import annotations

from torch import nn

__all__ = ["NORM_LAYERS", "layernorm_params", "lower_norm_params"]

# the norm layers the official collect_params take (github mr-eggplant/SAR sar.py 132; yushuntang/DPAL dpal.py 193)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
# what a timm ViT runs after its blocks (forward_features' ``norm``, then forward_head): the top SAR leaves alone
AFTER_BLOCKS = ("norm", "fc_norm", "attn_pool", "head")


def layernorm_params(module: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    """Affine weight and bias of every LayerNorm under ``module``, by qualified name (TENT's selection: every
    module named ``*norm*`` in the IMSE repository's tent.py 75-92, which on a timm ViT are its LayerNorms)."""
    params = {}
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.LayerNorm):
            for pname, param in sub.named_parameters(recurse=False):
                params[f"{name}.{pname}" if name else pname] = param
    return params


def lower_norm_params(vit: nn.Module, frozen_blocks: int, official: bool, prefix: str = "") -> dict[str, nn.Parameter]:
    """SAR's selection (DPAL's too) on a timm ViT: the norm layers' weight and bias outside the last
    ``frozen_blocks`` blocks, by name under ``prefix``, in the model's order.

    ``official=False`` (ours): the norms below the frozen blocks, that is blocks ``0 .. depth-1-frozen_blocks`` and
    those before the blocks (CLIP's ``norm_pre``); nothing after the blocks (the final ``norm``, MAE's ``fc_norm``).
    ``official=True``: what the official code selects (mr-eggplant/SAR sar.py 109-138, yushuntang/DPAL dpal.py
    158-198): every module but those named with ``blocks.9``, ``blocks.10``, ``blocks.11`` (ViT-B's last three:
    ``frozen_blocks=3`` on 12 blocks) or ``norm.``, or named ``norm``; so MAE's ``fc_norm`` adapts too."""
    depth = len(vit.blocks)
    adapted = depth - frozen_blocks
    if adapted < 1:
        raise ValueError(f"the LayerNorms of blocks 0..depth-1-{frozen_blocks} adapt; this ViT has {depth} blocks")
    frozen = {f"blocks.{index}" for index in range(adapted, depth)}
    params = {}
    for name, module in vit.named_modules():
        parts = name.split(".")
        if ".".join(parts[:2]) in frozen or not isinstance(module, NORM_LAYERS):
            continue
        if name == "norm" or "norm." in name or (not official and parts[0] in AFTER_BLOCKS):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                params[".".join(filter(None, (prefix, name, pname)))] = param
    return params
