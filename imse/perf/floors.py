"""The cost model: how many multiply-adds an IMSE step needs against a SAR step (the GEMM floor of their ratio)."""

from __future__ import annotations

import torch

from imse.core.spectral import SpectralLinear, find_vit


def _imse_layer_macs(out: int, inp: int, tokens: int, trained: bool, input_grad: bool) -> int:
    """Least GEMM multiply-adds of one IMSE layer in one SAM pass (forward + backward), rank ``r = min(in, out)``.

    Trained layers need ``∂L/∂S_i = Σ_n (x_n·v_i)(g_n·u_i)``. Factored: forward ``x Vhᵀ`` (T·in·r) then
    ``(· ⊙ S) Uᵀ`` (T·r·out); backward ``g U`` (T·out·r, which gives ∂S elementwise) and the input gradient
    ``(g U ⊙ S) Vh`` (T·r·in): ``2·T·r·(in + out)``. Dense: forward, input gradient and the weight gradient
    ``gᵀ x`` (3·T·in·out), plus rebuilding ``U diag(S) Vh`` and reading ``∂S`` off the weight gradient
    (2·out·r·in). The cheaper wins (dense for the square ``proj`` layers at batch 64, factored for the rest),
    as ``SpectralLinear`` chooses.
    Frozen-S layers of the last blocks still need ``x Vhᵀ`` (the diversity term), which makes factored least.
    """
    r = min(out, inp)
    factored = 2 * tokens * r * (inp + out) - (0 if input_grad else tokens * r * inp)
    if not trained:
        return factored
    dense = 3 * tokens * out * inp + 2 * out * r * inp - (0 if input_grad else tokens * out * inp)
    return min(factored, dense)


def step_floor(model: torch.nn.Module, batch: int, frozen_blocks: int = 3) -> dict:
    """GEMM multiply-adds of one SAR and one IMSE step (two SAM passes each) on ``model`` at ``batch``: the floor
    of the IMSE/SAR cost ratio. Elementwise work (softmax, norms, GELU, the std statistics) is not counted.

    Per SAM pass, with T tokens per image (``batch`` images) and attention ``2 T² d`` forward / ``4 T² d``
    backward per block, both methods:
    - SAR (LayerNorms of blocks ``0 .. depth-1-frozen``): forward ``T·in·out``; backward only the input gradient
      ``T·in·out`` (no weight gradients), from the head down to block 0 (its first LayerNorm trains).
    - IMSE (S of the same blocks; the last ``frozen`` blocks' ``x Vhᵀ`` feed the diversity term): per layer the
      least of the factored and dense routes, ``_imse_layer_macs``. Block 0's first layer needs no input
      gradient (nothing before it trains).
    """
    _, vit = find_vit(model)
    per_image = vit.patch_embed.num_patches + getattr(vit, "num_prefix_tokens", 1)
    tokens = per_image * batch  # every token row of the batch goes through each linear layer
    patch = vit.patch_embed.proj
    patch_macs = vit.patch_embed.num_patches * batch * patch.weight[0].numel() * patch.out_channels
    head = batch * vit.head.in_features * vit.head.out_features if isinstance(vit.head, torch.nn.Linear) else 0
    attention = 6 * per_image**2 * vit.embed_dim * batch  # 2 T² d forward + 4 T² d backward per image
    sar = imse = 2 * (patch_macs + 2 * head)  # forward + input gradient of the head, both methods, per pass
    depth = len(vit.blocks)
    for index, block in enumerate(vit.blocks):
        layers = (torch.nn.Linear, SpectralLinear)
        shapes = [(m.out_features, m.in_features) for m in block.modules() if isinstance(m, layers)]
        trained = index < depth - frozen_blocks
        sar_pass = sum(2 * tokens * o * i for o, i in shapes) + attention
        imse_pass = attention + sum(
            _imse_layer_macs(o, i, tokens, trained, input_grad=(index, n) != (0, 0)) for n, (o, i) in enumerate(shapes)
        )
        sar += 2 * sar_pass
        imse += 2 * imse_pass
    return {"sar_macs": sar, "imse_macs": imse, "ratio": imse / sar, "tokens": per_image}
