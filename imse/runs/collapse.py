"""The paper's collapse metric, measured the same way for every method: expert-alignment std in the last blocks.

Entropy minimisation can drive a model to answer everything alike; the IMSE paper sees it as the spread of the
inputs' alignment with the experts' directions shrinking (every token looks the same to each expert). ``L_dm`` is
IMSE's term against it. ``CollapseMeter`` measures that spread — per layer of the last ``blocks`` blocks, the
mean alignment std over all experts but the largest (``layer_diversity``, as in ``L_dm``) — on *any* model:
plain ``nn.Linear`` layers (Source, TENT, SAR) as well as spectral ones (IMSE). One set of right singular
vectors serves every method, since none changes them: TENT and SAR adapt LayerNorms, IMSE only ``S``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from imse.core.losses import AlignmentProbe, alignment_std, layer_diversity
from imse.core.spectral import DEFAULT_TARGETS, TARGET_PATHS, SpectralLinear, find_vit
from imse.core.svd_cache import decompose

__all__ = ["CollapseMeter"]


class CollapseMeter:
    """Per-layer expert-alignment std on the first forward pass of a model inside ``measure``.

    ``model`` supplies the layers' right singular vectors (its spectral layers' ``Vh``, else an SVD of the
    linear weights): pass the unadapted backbone. Any model with the same layer names can then be measured.
    """

    def __init__(self, model: nn.Module, blocks: int = 3, ratio: float = 1.0, cache=None) -> None:
        prefix, vit = find_vit(model)
        depth = len(vit.blocks)
        if not 0 < blocks <= depth:
            raise ValueError(f"blocks must be in 1..{depth} for a ViT with {depth} blocks, got {blocks}")
        self.ratio = ratio
        self.bases: dict[str, torch.Tensor] = {}
        for index in range(depth - blocks, depth):
            for target in DEFAULT_TARGETS:
                name = f"{prefix}.blocks.{index}.{TARGET_PATHS[target]}".lstrip(".")
                layer = model.get_submodule(name)
                if isinstance(layer, SpectralLinear):
                    Vh = layer.Vh
                elif isinstance(layer, nn.Linear):
                    Vh = (cache.decompose(layer.weight) if cache is not None else decompose(layer.weight))[2]
                else:
                    raise TypeError(f"{name} is {type(layer).__name__}, not a linear layer")
                self.bases[name] = Vh.detach()

    @property
    def layers(self) -> list[str]:
        return list(self.bases)

    @contextmanager
    def measure(self, model: nn.Module, probe: AlignmentProbe | None = None) -> Iterator[list[float]]:
        """Yields a list that holds, after the block, one value per layer (``layers`` order) from the first
        forward pass made inside it (SAM's second pass is not counted: the first is the one predictions come
        from). Empty if the model was not run.

        ``probe``: the ``AlignmentProbe`` of the method running ``model`` (``TTAMethod.probe``). A layer whose
        alignment std that probe computes during the same call (IMSE's diversity layers: its loss needs them) is
        read from it rather than computed a second time — the same numbers, without another GEMM and std."""
        found: dict[str, torch.Tensor] = {}
        values: list[float] = []
        before: dict[str, torch.Tensor | None] = {}

        def stats() -> dict[str, torch.Tensor]:
            return probe.stats if probe is not None and probe.capturing else {}

        def pre_hook_for(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                before[name] = stats().get(name)  # what the probe held before this call

            return hook

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if name in found:
                    return
                with torch.no_grad():
                    known = stats().get(name)
                    if known is not None and known is not before.get(name):  # computed by this very call
                        std = known.detach()
                    else:
                        x = args[0].detach()
                        std = alignment_std(x, self.bases[name].to(x.device))
                    found[name] = layer_diversity(std, self.ratio)

            return hook

        handles = []
        for name in self.bases:
            layer = model.get_submodule(name)
            handles.append(layer.register_forward_pre_hook(pre_hook_for(name)))
            handles.append(layer.register_forward_hook(hook_for(name)))
        try:
            yield values
        finally:
            for handle in handles:
                handle.remove()
        if len(found) == len(self.bases):
            values.extend(torch.stack([found[name].float() for name in self.bases]).tolist())

    @torch.no_grad()
    def expert_stds(self, model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every expert's alignment std (not only the layer mean) of ``model`` on the batch ``x``, per layer
        (``layers`` order), and the model's output on it: what the Teach tab's collapse view draws. One forward
        pass, no adaptation."""
        found: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                inputs = args[0].detach()
                found[name] = alignment_std(inputs, self.bases[name].to(inputs.device)).float().cpu()

            return hook

        handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in self.bases]
        try:
            output = model(x)
        finally:
            for handle in handles:
                handle.remove()
        return {name: found[name] for name in self.bases}, output

    def layer_means(self, stds: dict[str, torch.Tensor]) -> list[float]:
        """The per-layer numbers ``measure`` reports, from per-expert stds (all experts but the largest)."""
        return [float(layer_diversity(stds[name], self.ratio)) for name in self.bases]
