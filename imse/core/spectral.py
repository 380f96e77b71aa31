"""Spectral experts: a linear layer split by SVD into rank-1 terms whose scales are the only trainable values.

``W = U diag(S) Vh``; the rank-1 term ``S_i u_i v_iᵀ`` is expert *i*. ``U`` and ``Vh`` are frozen buffers,
``S`` is the single Parameter and ``S0`` remembers where it started. The set of all ``S`` vectors of a model is
its *spectral code*: small (tens of thousands of numbers for ViT-B), saved as safetensors and restored exactly
(``imse.core.codes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "TARGET_PATHS",
    "CodeMismatchError",
    "SpectralLinear",
    "check_code",
    "code_layers",
    "evaluated_with",
    "find_vit",
    "get_code",
    "inject",
    "merge",
    "relative_code",
    "reset_code",
    "set_code",
    "set_path",
    "spectral_layers",
]

# Short target names -> the attribute path inside a timm ViT ``Block``.
TARGET_PATHS: dict[str, str] = {
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
DEFAULT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

# Weights that replace layers' own in the forward passes of one context (``evaluated_with``): another σ tried on a
# model that other threads share, without writing to it.
_OVERRIDES: ContextVar[dict[nn.Module, torch.Tensor] | None] = ContextVar("imse_weight_overrides", default=None)


class CodeMismatchError(ValueError):
    """A spectral code does not fit the model it is applied to (names, shapes or source weights differ)."""


class SpectralLinear(nn.Module):
    """``nn.Linear`` re-expressed as ``U diag(S) Vh`` (+ bias), with only ``S`` trainable.

    The SVD runs in float64 so that the factors, once rounded to the layer's dtype, reproduce the original
    output to about 1e-7 relative in float32. The full weight is *not* kept: ``U`` and ``Vh`` alone hold the
    layer (``merge`` turns it back into a plain ``nn.Linear`` when inference speed matters). Each call computes
    either ``x (U diag(S) Vh)ᵀ`` or ``((x Vhᵀ) ⊙ S) Uᵀ``, whichever needs fewer multiply-adds; both are exact.
    """

    def __init__(
        self,
        U: torch.Tensor,
        S: torch.Tensor,
        Vh: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if U.ndim != 2 or Vh.ndim != 2 or S.ndim != 1:
            raise ValueError("expected U (out x r), S (r,), Vh (r x in)")
        if not (U.shape[1] == S.shape[0] == Vh.shape[0]):
            raise ValueError(f"rank mismatch: U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)}")
        self.in_features = Vh.shape[1]
        self.out_features = U.shape[0]
        self.rank = S.shape[0]
        self.register_buffer("U", U.detach().clone().contiguous())
        self.register_buffer("Vh", Vh.detach().clone().contiguous())
        self.register_buffer("S0", S.detach().clone())
        self.S = nn.Parameter(S.detach().clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            # The bias stays a parameter of the model, untouched (methods decide what trains).
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        # "auto" picks the cheaper of the dense and factored computations per call; "dense"/"factored" force one.
        self.path = "auto"
        # When set, called as ``hook(x, x @ Vhᵀ)`` on every forward (this forces the factored path, whose first
        # GEMM is exactly that projection): how IMSE's alignment statistics are gathered at no extra GEMM.
        self.projection_hook = None
        # Inference calls (no S gradient) reuse ``U diag(S) Vh`` while S is unchanged: (key of S, U, Vh; weight).
        self._merged: tuple[tuple, torch.Tensor] | None = None
        self._seen_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, cache=None) -> SpectralLinear:
        """Decompose ``linear.weight`` (float64 SVD, thin; through ``cache``, an ``SVDCache``, when given) and
        keep its bias."""
        from imse.core.svd_cache import decompose

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        U, S, Vh = cache.decompose(weight) if cache is not None else decompose(weight)
        return cls(U, S, Vh, linear.bias)

    def weight(self) -> torch.Tensor:
        """The current dense weight ``U diag(S) Vh`` (differentiable in ``S``)."""
        return (self.U * self.S) @ self.Vh

    def _weights_key(self) -> tuple:
        # in-place updates (optimiser steps, set_code, load_state_dict) bump _version; .to() changes data_ptr
        return tuple((t._version, t.data_ptr(), t.dtype) for t in (self.S, self.U, self.Vh))

    def _inference_weight(self) -> torch.Tensor | None:
        """The merged weight for an inference call (no autograd), or None (then the per-call cost choice decides).

        Kept from the previous call while S, U and Vh are unchanged; built on the *second* call that sees the
        same weights, so a stream of adaptation steps (S changes every batch) never pays for a rebuild it
        cannot reuse, while repeated inference at a fixed code runs at the plain model's cost.
        """
        key = self._weights_key()
        if self._merged is not None and self._merged[0] == key:
            return self._merged[1]
        self._merged = None
        if self._seen_key != key:
            self._seen_key = key
            return None
        with torch.no_grad():
            weight = self.weight()
        self._merged = (key, weight)
        return weight

    def use_factored(self, rows: int, input_grad: bool) -> bool:
        """Whether ``(x Vhᵀ) S Uᵀ`` costs fewer multiply-adds than rebuilding ``W`` and applying it.

        Counted for what this call will need: forward only, plus the input gradient, plus the S gradient
        (which the factored form gets elementwise, while the dense form needs a weight-gradient GEMM).
        """
        if self.path != "auto":
            return self.path == "factored"
        o, i, r = self.out_features, self.in_features, self.rank
        s_grad = torch.is_grad_enabled() and self.S.requires_grad
        passes = 2 if (s_grad or (torch.is_grad_enabled() and input_grad)) else 1
        factored = passes * rows * r * (i + o)
        dense = passes * rows * o * i + o * r * i
        if s_grad:
            dense += rows * o * i + o * r * i  # weight-gradient GEMM and the rebuild's backward
        return factored < dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        overrides = _OVERRIDES.get()
        if overrides is not None and self in overrides:
            return F.linear(x, overrides[self].to(x.dtype), self.bias)
        if not torch.is_grad_enabled() and self.projection_hook is None and self.path == "auto":
            weight = self._inference_weight()
            if weight is not None:
                return F.linear(x, weight, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if self.projection_hook is not None or self.use_factored(rows, x.requires_grad):
            projection = F.linear(x, self.Vh)  # a_{n,i} · ‖x_n‖: how each row aligns with each expert
            if self.projection_hook is not None:
                self.projection_hook(x, projection)
            if (torch.is_grad_enabled() and self.S.requires_grad) or projection.numel() <= self.U.numel():
                # ∂S is then elementwise, no GEMM. S in the projection's dtype: under bf16 autocast a float32 S
                # would promote the rows to float32 (and the next GEMM cast them back), both ways
                return F.linear(projection * self.S.to(projection.dtype), self.U, self.bias)
            # S needs no gradient (a frozen diversity layer, inference) and the rows outnumber U's: scaling U's
            # columns once replaces a pass over the projection forward and another in the backward
            return F.linear(projection, self.U * self.S, self.bias)
        return F.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def reset(self) -> None:
        """Put ``S`` back to its value right after decomposition."""
        self.S.copy_(self.S0)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes now (the code folded into the weight)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.S.device, dtype=self.S.dtype
        )
        linear.weight.copy_(self.weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={has_bias}"


def find_vit(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the timm-style ViT inside ``model`` (the module that has ``blocks`` and ``patch_embed``).

    Returns ``(prefix, vit)`` where ``prefix`` is the qualified name of the ViT inside ``model`` ("" if it is
    the model itself). Wrappers (e.g. one that folds input normalisation in front) are looked through.
    """
    for name, module in model.named_modules():
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            return name, module
    raise ValueError(
        f"{type(model).__name__} has no timm VisionTransformer inside (no module with `blocks` and `patch_embed`)"
    )


def _qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _resolve_targets(targets: Iterable[str]) -> list[str]:
    paths = []
    for target in targets:
        if target in TARGET_PATHS:
            paths.append(TARGET_PATHS[target])
        elif "." in target:
            paths.append(target)  # a path inside a block, e.g. "attn.qkv"
        else:
            raise ValueError(f"unknown target {target!r}; use one of {sorted(TARGET_PATHS)} or a path like 'mlp.fc1'")
    return paths


def inject(
    model: nn.Module,
    blocks: Iterable[int] | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    cache=None,
) -> list[str]:
    """Replace the target ``nn.Linear`` layers of the chosen ViT blocks by ``SpectralLinear`` in place.

    ``blocks``: block indices (negative ones count from the end); ``None`` means every block. ``targets``:
    short names (``qkv``, ``proj``, ``fc1``, ``fc2``) or paths inside a block. ``cache``: an ``SVDCache``
    (``imse.svd_cache.default_svd_cache()`` is the shared one) to skip recomputing known decompositions.
    Layers that are already spectral are left alone. Returns the qualified names (relative to ``model``) that
    were replaced, in block order.
    """
    prefix, vit = find_vit(model)
    depth = len(vit.blocks)
    indices = range(depth) if blocks is None else [b + depth if b < 0 else b for b in blocks]
    paths = _resolve_targets(targets)
    replaced = []
    for index in indices:
        if not 0 <= index < depth:
            raise IndexError(f"block {index} out of range for a ViT with {depth} blocks")
        block = vit.blocks[index]
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            layer = getattr(parent, attr, None)
            if isinstance(layer, SpectralLinear):
                continue
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"blocks.{index}.{path} is {type(layer).__name__}, not nn.Linear")
            setattr(parent, attr, SpectralLinear.from_linear(layer, cache))
            replaced.append(_qualify(prefix, f"blocks.{index}.{path}"))
    return replaced


def spectral_layers(model: nn.Module) -> dict[str, SpectralLinear]:
    """All spectral layers of ``model`` by qualified name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SpectralLinear)}


def set_path(model: nn.Module, path: str) -> None:
    """Force how every spectral layer computes: ``"auto"`` (cheapest per call), ``"dense"`` or ``"factored"``."""
    if path not in ("auto", "dense", "factored"):
        raise ValueError(f"path must be 'auto', 'dense' or 'factored', got {path!r}")
    for layer in spectral_layers(model).values():
        layer.path = path


def code_layers(model: nn.Module) -> dict[str, SpectralLinear]:
    """The spectral layers keyed as a code keys them: by name relative to the ViT inside ``model``
    (``blocks.0.attn.qkv``), so a code saved from a bare timm ViT fits the same ViT inside a wrapper (the
    built-in backbone's ``model.``) and back. Models without a ViT keep their qualified names."""
    layers = spectral_layers(model)
    try:
        prefix, _ = find_vit(model)
    except ValueError:
        return layers
    cut = prefix + "." if prefix else ""
    return {name.removeprefix(cut): layer for name, layer in layers.items()}


def relative_code(model: nn.Module, code: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``code`` keyed relative to the ViT: codes and banks written before codes were portable carry the
    wrapper's prefix."""
    try:
        prefix, _ = find_vit(model)
    except ValueError:
        return dict(code)
    cut = prefix + "." if prefix else ""
    return {name.removeprefix(cut) if cut else name: value for name, value in code.items()}


def get_code(model: nn.Module) -> dict[str, torch.Tensor]:
    """The spectral code: a detached copy of every layer's ``S``, keyed by name relative to the ViT
    (``code_layers``)."""
    return {name: layer.S.detach().clone() for name, layer in code_layers(model).items()}


def check_code(layers: Mapping[str, SpectralLinear], code: Mapping[str, torch.Tensor]) -> None:
    missing = [name for name in layers if name not in code]
    unexpected = [name for name in code if name not in layers]
    wrong_shape = [
        f"{name}: code {tuple(code[name].shape)} vs model {tuple(layer.S.shape)}"
        for name, layer in layers.items()
        if name in code and tuple(code[name].shape) != tuple(layer.S.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing for {len(missing)} layer(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown layer(s), e.g. {unexpected[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:3]}")
    if problems:
        raise CodeMismatchError("spectral code does not fit this model: " + "; ".join(problems))


@torch.no_grad()
def set_code(model: nn.Module, code: Mapping[str, torch.Tensor]) -> None:
    """Copy ``code`` into the model's ``S`` vectors; names and shapes must match exactly (nothing is changed
    if they do not)."""
    layers = code_layers(model)
    if not layers:
        raise CodeMismatchError("model has no spectral layers; call imse.core.spectral.inject(model) first")
    code = relative_code(model, code)
    check_code(layers, code)
    for name, layer in layers.items():
        layer.S.copy_(code[name].to(device=layer.S.device, dtype=layer.S.dtype))


@torch.no_grad()
def reset_code(model: nn.Module) -> None:
    """Put every ``S`` back to ``S0``."""
    for layer in spectral_layers(model).values():
        layer.reset()


@torch.no_grad()
def merge(model: nn.Module) -> list[str]:
    """Fold every spectral layer back into a plain ``nn.Linear`` holding the current weight (in place).

    After merging, inference costs exactly what the original model cost. Returns the merged names.
    """
    merged = []
    for name, layer in list(spectral_layers(model).items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer.to_linear())
        merged.append(name)
    return merged


@contextmanager
def evaluated_with(model: nn.Module, sigmas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, this thread's forward passes of ``model`` use ``sigmas[name]`` in place of the named
    spectral layers' ``S`` (names as ``spectral_layers`` gives them). For evaluation: no gradient reaches ``S``;
    other threads, and the model's parameters, see no change."""
    layers = spectral_layers(model)
    unknown = set(sigmas) - set(layers)
    if unknown:
        raise KeyError(f"not spectral layers of this model: {sorted(unknown)[:3]}")
    with torch.no_grad():
        weights = {
            layers[name]: (layers[name].U * sigma.to(layers[name].U)) @ layers[name].Vh
            for name, sigma in sigmas.items()
        }
    token = _OVERRIDES.set(weights)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)
