"""DPAL (Tang et al.): domain prompts plus per-sample predictors, adapted with SAR's sharpness-aware update.

Follows github yushuntang/DPAL (``dpal.py``, ``models/dpal_transformer.py`` at 0f7b8ff): a learnable prompt token
goes in front of the CLS token after the position embedding and, before each later block, a "deep" prompt of
its own replaces it; after every block a predictor MLP (zero-initialised) reads the prompt token's output and its
output is subtracted from the CLS token. The loss is the reliable samples' entropy (``E0 = margin · ln C``) plus
``(reliable / batch) ·`` the negated mean cosine similarity between the samples' predictor outputs, averaged over
blocks. The predictors take a plain SGD step on the first pass's gradient; the prompts and the LayerNorms below the
last ``frozen_blocks`` blocks take SAM's two passes over SGD (second pass: entropy of the samples still
reliable); SAR's recovery (EMA 0.9 of the second loss below 0.2 → back to the initial state, the EMA kept, as the
official ``forward`` restores it). Every lr 0.01, momentum 0.9, ρ 0.05.

Deviations, on purpose (the lab protocol; ``--protocol paper`` sets the official ones):

- The prediction is the first pass's (pre-update, as every method here); ``predict_from="second"`` returns the
  official code's, made at the perturbed prompts after the predictors' step.
- Recovery restores the initial weights and clears both optimizers' momentum. ``official_recovery=True``: the
  official ``reset`` loads SAM's state dict, which holds SAM's own state only (official sam.py 60-62), so the
  SGD momentum under SAM survives and moves the restored prompts and LayerNorms at the next step; the
  predictors' optimizer is reset (dpal.py 61-66, 231-235).
- An empty reliable set (at either pass) moves nothing and is counted. ``official_recovery=True``: the official
  loss is then NaN with zero gradients (a mean over no sample), so both optimizers still step on momentum alone
  (dpal.py 113-130); at the first pass, the predictors before the second forward, SAM's base after it.
- The similarity weight is ``reliable / the batch's size``. ``similarity_divisor="configured"``: ``reliable /
  batch_size``, the configured batch size, as the official ``args.test_batch_size`` (dpal.py 113); they differ
  on a short last batch.
- The network is timm's around the prompts, and the LayerNorms adapted are those below the frozen blocks (CLIP's
  ``norm_pre`` too, not MAE's ``fc_norm``). ``official_forward=True``: the published network (no ``norm_pre``;
  MAE's average pool takes the CLS token in; ``PromptedViT``) and the official selection (dpal.py 158-198: every
  LayerNorm outside the frozen blocks but the final ``norm``; ``fc_norm`` moves, ``norm_pre`` is selected but
  never read, so it stays). On a plain ViT both are the same.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imse.core.images import vit_input
from imse.core.losses import entropy_margin, softmax_entropy
from imse.core.methods.base import TTAMethod
from imse.core.methods.norms import lower_norm_params
from imse.core.sam import SAM, momentum_step
from imse.core.spectral import find_vit

__all__ = ["DPAL", "PromptedViT", "prompt_similarity_loss"]


class PromptedViT(nn.Module):
    """A backbone (or bare timm ViT) with DPAL's prompt tokens and predictors; ``forward`` returns the logits and
    keeps the predictors' outputs of that pass in ``noises`` (one ``[B, d]`` tensor per block).

    Ours runs timm's network around the prompts (CLIP's ``norm_pre``, patch dropout, the head's pooling of the
    model's own tokens). ``official_forward=True`` runs the published one (models/dpal_transformer.py 74-91): no
    ``norm_pre`` and no patch dropout; ``norm`` on every token; an average pool (MAE) over every token from
    ``num_prefix_tokens`` on in the prompted layout [prompts, CLS, patches], so the CLS token (and every prompt
    but the first) joins the patches; ``fc_norm``, the head. On a plain ViT (class-token pool, no norm_pre) the
    two are the same network."""

    def __init__(self, model: nn.Module, num_prompts: int = 1, official_forward: bool = False) -> None:
        super().__init__()
        self.model = model
        self.official_forward = official_forward
        _, vit = find_vit(model)
        self.vit = vit
        dim, depth = vit.embed_dim, len(vit.blocks)
        patch = math.prod(vit.patch_embed.patch_size)
        bound = math.sqrt(6.0 / (3 * patch + dim))  # the official initialisation (VPT's)
        self.num_prompts = num_prompts
        self.prompt = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        self.deep_prompts = nn.Parameter(torch.empty(depth - 1, num_prompts, dim).uniform_(-bound, bound))
        self.predictors = nn.ModuleList(
            nn.Sequential(nn.Linear(num_prompts * dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
            for _ in range(depth)
        )
        with torch.no_grad():
            for parameter in self.predictors.parameters():
                parameter.zero_()
        # drawn on the CPU (the same draws on every device), then kept beside the ViT they prompt
        weight = vit.patch_embed.proj.weight
        self.prompt.data = self.prompt.data.to(weight.device, weight.dtype)
        self.deep_prompts.data = self.deep_prompts.data.to(weight.device, weight.dtype)
        self.predictors.to(weight.device, weight.dtype)
        self.noises: list[torch.Tensor] = []
        for attribute in ("name", "class_names", "input_size"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """What the ViT is fed: the backbone's normalisation unless a method switched it off (``preprocessing=
        "unit"``): ``imse.core.images.vit_input``, the one rule of every forward."""
        return vit_input(self.model, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit, count = self.vit, self.num_prompts
        tokens = vit._pos_embed(vit.patch_embed(self.normalize(x)))
        if not self.official_forward:  # timm's forward_features up to the blocks (CLIP's norm_pre, patch dropout)
            tokens = vit.norm_pre(vit.patch_drop(tokens))
        batch = tokens.shape[0]
        tokens = torch.cat((self.prompt.expand(batch, -1, -1), tokens), dim=1)  # [prompt, CLS, patches]
        noises = []
        for index, block in enumerate(vit.blocks):
            if index > 0:
                tokens = torch.cat((self.deep_prompts[index - 1].expand(batch, -1, -1), tokens[:, count:]), dim=1)
            tokens = block(tokens)
            noise = self.predictors[index](tokens[:, :count].reshape(batch, -1))
            noises.append(noise)
            cls = tokens[:, count] - noise
            tokens = torch.cat((tokens[:, :count], cls[:, None], tokens[:, count + 1 :]), dim=1)
        self.noises = noises
        if self.official_forward:
            return self._official_head(tokens)
        # the prompts leave before timm's head: its pooling (the CLS token, or MAE's average) sees the model's tokens
        return vit.forward_head(vit.norm(tokens[:, count:]))

    def _official_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """models/dpal_transformer.py 83, 87-91: ``norm`` on every token, the pool in the prompted layout (the
        average from ``num_prefix_tokens`` on, else the CLS token), ``fc_norm``, the head."""
        vit = self.vit
        tokens = vit.norm(tokens)
        if vit.global_pool == "avg":
            tokens = tokens[:, vit.num_prefix_tokens :].mean(dim=1)
        elif vit.global_pool:
            tokens = tokens[:, self.num_prompts]
        return vit.head(vit.fc_norm(tokens))


def prompt_similarity_loss(noises: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of ``−mean_ij cos(n_i, n_j)`` over every pair of samples (the diagonal included), in
    float32 whatever the predictors' dtype (bfloat16 under ``precision="bf16"``)."""
    noises = [n.float() for n in noises]  # a float32 tensor is itself: fp32 results stay bit for bit
    return torch.stack([-F.cosine_similarity(n[:, None], n[None], dim=2).mean() for n in noises]).mean()


class DPAL(TTAMethod):
    name = "dpal"
    label = "DPAL"
    coupled_rates = ("predictor_lr",)
    sweep_checks = (("margin_classes", (None, 1000)),)

    @classmethod
    def paper_settings(cls, scenario: str) -> dict[str, Any]:
        return {"margin_classes": 1000, "predict_from": "second", "official_recovery": True,
                "similarity_divisor": "configured", "official_forward": True}  # fmt: skip

    defaults = {
        "lr": 0.01,  # prompts and LayerNorms (SAM over SGD)
        "predictor_lr": 0.01,
        "momentum": 0.9,
        "rho": 0.05,
        "margin": 0.4,
        "margin_classes": None,  # C in E0 = margin · ln C; the official code: 1000
        "num_prompts": 1,
        "frozen_blocks": 3,  # LayerNorms of blocks 0 .. depth-1-frozen_blocks adapt
        "reset_threshold": 0.2,
        "ema_momentum": 0.9,
        "predict_from": "first",  # "second": the official code's prediction
        "official_recovery": False,  # True: the official recovery and empty-set step (see the module's docstring)
        "similarity_divisor": "batch",  # "configured": reliable / batch_size (the official)
        "batch_size": None,  # the run's configured batch size (the runner sets it)
        "official_forward": False,  # True: the published network and LayerNorms (PromptedViT, the module's docstring)
    }

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        if self.hparams["predict_from"] not in ("first", "second"):
            raise ValueError(f"predict_from must be 'first' or 'second', got {self.hparams['predict_from']!r}")
        divisor = self.hparams["similarity_divisor"]
        if divisor not in ("batch", "configured"):
            raise ValueError(f"similarity_divisor must be 'batch' or 'configured', got {divisor!r}")
        if divisor == "configured" and not self.hparams["batch_size"]:
            raise ValueError("similarity_divisor='configured' needs batch_size (the run's configured batch size)")
        official = self.hparams["official_forward"]
        self.prompted = PromptedViT(model, self.hparams["num_prompts"], official_forward=official)
        params = {"prompt": self.prompted.prompt, "deep_prompts": self.prompted.deep_prompts}
        params.update(lower_norm_params(self.prompted.vit, self.hparams["frozen_blocks"], official))
        self.sam_names = list(params)
        params.update({f"predictors.{name}": p for name, p in self.prompted.predictors.named_parameters()})
        self.ema: float | None = None
        return params

    def build_optimizer(self, params: list[nn.Parameter]) -> SAM:
        sam_params = [self.trainable[name] for name in self.sam_names]
        predictors = [p for name, p in self.trainable.items() if name.startswith("predictors.")]
        momentum = self.hparams["momentum"]
        self.predictor_optimizer = torch.optim.SGD(predictors, lr=self.hparams["predictor_lr"], momentum=momentum)
        self._initial_predictor_optimizer = copy.deepcopy(self.predictor_optimizer.state_dict())
        return SAM(torch.optim.SGD(sam_params, lr=self.hparams["lr"], momentum=momentum), rho=self.hparams["rho"])

    def run_model(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The prompted ViT's forward, under the method's precision (``TTAMethod.run_model``)."""
        return super().run_model(x, self.prompted if model is None else model)

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        sam: SAM = self.optimizer
        sam.zero_grad()
        self.predictor_optimizer.zero_grad(set_to_none=True)
        logits = self.run_model(x)
        margin = entropy_margin(self.hparams["margin_classes"] or logits.shape[-1], self.hparams["margin"])
        entropy = softmax_entropy(logits)
        keep = entropy.detach() < margin
        similarity = prompt_similarity_loss(self.prompted.noises)
        record: dict[str, Any] = {"entropy": float(entropy.detach().mean()), "num_reliable": int(keep.sum()),
                                  "similarity": float(similarity.detach()), "loss": None, "loss_second": None,
                                  "updated": False, "skip_reason": None}  # fmt: skip
        first = logits.detach()
        if not bool(keep.any()):
            record["skip_reason"] = "no reliable samples"
            prediction = self._empty_first_pass(x, first, record)
            return prediction, self._finish(record)
        divisor = self.hparams["batch_size"] if self.hparams["similarity_divisor"] == "configured" else x.shape[0]
        loss = entropy[keep].mean() + (int(keep.sum()) / divisor) * similarity
        record["loss"] = float(loss.detach())
        if not math.isfinite(record["loss"]):
            record["skip_reason"] = "non-finite loss (step 1)"
            return first, self._finish(record)
        loss.backward()
        self.predictor_optimizer.step()
        sam.first_step(zero_grad=True)
        second = self.run_model(x)
        prediction = second.detach() if self.hparams["predict_from"] == "second" else first
        entropy2 = softmax_entropy(second)[keep]
        reliable2 = entropy2.detach() < margin
        if not bool(reliable2.any()):
            sam.restore()
            record["skip_reason"] = "no reliable samples (step 2)"
            if self.hparams["official_recovery"]:
                momentum_step(sam.base_optimizer)
                record["momentum_only"] = True
            return prediction, self._finish(record)
        loss2 = entropy2[reliable2].mean()
        record["loss_second"] = float(loss2.detach())
        loss2.backward()
        sam.second_step(zero_grad=True)
        record["updated"] = True
        return prediction, self._finish(record)

    def _empty_first_pass(self, x: torch.Tensor, first: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
        """No reliable sample at the first pass: nothing moves (ours), or, with ``official_recovery``, the
        official order with zero gradients: the predictors' momentum step, the second forward (the official
        prediction; SAM's ascent is zero), SAM's base momentum step."""
        if not self.hparams["official_recovery"]:
            return first
        momentum_step(self.predictor_optimizer)
        prediction = first
        if self.hparams["predict_from"] == "second":
            with torch.no_grad():
                prediction = self.run_model(x).detach()
        momentum_step(self.optimizer.base_optimizer)
        record["momentum_only"] = True
        return prediction

    def _finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """SAR's recovery as the official code runs it: the EMA is kept across a reset."""
        self.optimizer.zero_grad()
        self.predictor_optimizer.zero_grad(set_to_none=True)
        recovered = False
        if record["loss_second"] is not None:
            m = self.hparams["ema_momentum"]
            self.ema = record["loss_second"] if self.ema is None else m * self.ema + (1 - m) * record["loss_second"]
        if self.ema is not None and self.ema < self.hparams["reset_threshold"]:
            self.recover()
            recovered = True
        record.update(loss_ema=self.ema, recovered=recovered)
        return record

    @torch.no_grad()
    def recover(self) -> None:
        """SAR's model recovery: ours restores everything as at construction; with ``official_recovery`` the
        weights and the predictors' optimizer only (the SGD momentum under SAM survives, as the official)."""
        if not self.hparams["official_recovery"]:
            self.restore_initial()
            return
        for name, param in self.trainable.items():
            param.copy_(self._initial_params[name])
        self.predictor_optimizer.load_state_dict(copy.deepcopy(self._initial_predictor_optimizer))

    def restore_initial(self) -> None:
        super().restore_initial()
        self.predictor_optimizer.load_state_dict(copy.deepcopy(self._initial_predictor_optimizer))

    def reset_state(self) -> None:
        self.ema = None
