"""ViDA (Liu et al., ICLR 2024): continual TTA with visual domain adapters and a mean teacher.

Follows github Yangsenqiao/vida (``imagenet/vida.py``, ``inject_vida.py``, ``cfgs/vit/vida.yaml`` at c26b0db):
every attention ``qkv`` and ``proj`` of every block gets a low-rank (rank 1) and a "high-rank" (rank 128)
bottleneck adapter beside it; the teacher (an EMA of the student: 0.999, 0.8 for adapters) predicts on 10 CoTTA
augmentations of the batch, ``0.1 ×`` the mean variance of those logits is the uncertainty, which sets the
adapters' scales (≥ 0.2: low = 1 − u, high = 1 + u; else the reverse); the student minimises the symmetric
cross-entropy to the teacher's prediction with SGD (Nesterov, momentum 0.9) at lr 5e-7 for the ViT's own weights
and 2e-7 for the adapters — every weight trains. The prediction is the teacher's, before the update.

The official ImageNet-C run starts from a source warm-up ("our source ViDA model": adapters trained on source
data first); ``checkpoint`` loads one (``imse.runs.vida_warmup`` makes them; the official file's layout loads too).
Without one the up-projections start at zero and ViDA answers exactly as Source.

Deviations, on purpose: none in the rule. Two facts of the official code are kept and named: its ``set_scale``
sets only the low-rank scale (``if hasattr(m, 'scale1') … elif hasattr(m, 'scale2')`` never reaches the
``elif``), so the high-rank scale stays 1 (``scale_high_follows=False``; ``True`` sets both, as the paper
describes); and its augmentations' random draws come from Python/torch global state — here from the method's own
generator (``seed``), so that a run is reproducible and ``reset`` is exact.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imse.core.methods.base import TTAMethod
from imse.core.spectral import find_vit

__all__ = [
    "DomainAdapters",
    "ViDA",
    "adapter_names",
    "cotta_augment",
    "inject_adapters",
    "load_warmup",
    "read_warmup",
    "symmetric_cross_entropy",
]

# The official checkpoint's names (github Yangsenqiao/vida imagenet/inject_vida.py 11-26: ``linear_vida`` the wrapped
# layer, ``vida_down``/``vida_up`` rank r1, ``vida_down2``/``vida_up2`` rank r2) -> ours. The file is a state dict of
# the whole model behind ``torch.nn.DataParallel`` (``module.``; imagenet/vida.py 199-202), or in the IMSE repository
# behind its normaliser too (``module.model.``; baek85/IMSE method/vida.py 236-250).
_OFFICIAL_PARTS = {".linear_vida.": ".linear.", ".vida_down2.": ".down_high.", ".vida_up2.": ".up_high.",
                   ".vida_down.": ".down_low.", ".vida_up.": ".up_low."}  # fmt: skip
WARMUP_FORMAT = "imse-vida-warmup/1"


class DomainAdapters(nn.Module):
    """A linear layer with two bottleneck adapters beside it:
    ``y = W x + b + scale_low · up_low(down_low(x)) + scale_high · up_high(down_high(x))``."""

    def __init__(self, linear: nn.Module, low_rank: int = 1, high_rank: int = 128) -> None:
        super().__init__()
        self.linear = linear
        inputs, outputs = linear.in_features, linear.out_features
        self.down_low = nn.Linear(inputs, low_rank, bias=False)
        self.up_low = nn.Linear(low_rank, outputs, bias=False)
        self.down_high = nn.Linear(inputs, high_rank, bias=False)
        self.up_high = nn.Linear(high_rank, outputs, bias=False)
        with torch.no_grad():  # the official initialisation: down ~ N(0, 1/r²), up = 0 (the adapters start at 0)
            self.down_low.weight.normal_(0.0, 1.0 / low_rank**2)
            self.down_high.weight.normal_(0.0, 1.0 / high_rank**2)
            self.up_low.weight.zero_()
            self.up_high.weight.zero_()
        # drawn on the CPU (the same draws on every device), then kept beside the layer they adapt
        self.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.scale_low = 1.0
        self.scale_high = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.up_low(self.down_low(x)) * self.scale_low
        return self.linear(x) + low + self.up_high(self.down_high(x)) * self.scale_high


def inject_adapters(model: nn.Module, low_rank: int = 1, high_rank: int = 128) -> list[str]:
    """Put ``DomainAdapters`` around every block's ``attn.qkv`` and ``attn.proj`` (not the MLP, as the official
    code); returns the wrapped layers' names."""
    prefix, vit = find_vit(model)
    names = []
    for index, block in enumerate(vit.blocks):
        for attribute in ("qkv", "proj"):
            layer = getattr(block.attn, attribute)
            if not isinstance(layer, DomainAdapters):
                setattr(block.attn, attribute, DomainAdapters(layer, low_rank, high_rank))
            names.append(f"{prefix}.blocks.{index}.attn.{attribute}".lstrip("."))
    return names


def adapter_names(vit: nn.Module) -> list[str]:
    """The adapters' own parameters of an injected ViT, by name relative to it (what a warm-up trains)."""
    return [name for name, _ in vit.named_parameters() if ViDA.is_adapter(name)]


def _official_key(key: str) -> str:
    # DataParallel's ``module.``, then RobustBench's normaliser's ``model.`` (a timm ViT has no module of that name)
    key = f".{key.removeprefix('module.').removeprefix('model.')}"
    for theirs, ours in _OFFICIAL_PARTS.items():
        key = key.replace(theirs, ours)
    return key[1:]


def _floats(values: torch.Tensor) -> str:
    return ", ".join(f"{value:.9g}" for value in values.double().flatten().tolist())


def _trained_inputs(state: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """The inputs an official file's network was trained on, read from the normaliser it was saved behind
    (RobustBench's ``normalize.mean`` and ``.std``, taken out of ``state``): mean 0 and std 1, or no normaliser
    (the bare timm ViT of ViDA's own run), mean [0, 1] images (``unit``); other values, images normalised with
    them (``backbone``, the statistics as ``mean`` and ``std``)."""
    mean, std = state.pop("normalize.mean", None), state.pop("normalize.std", None)
    if (mean is None) != (std is None):
        raise ValueError(f"{path} holds one of the normaliser's mean and std, not both")
    if mean is None or (bool((mean == 0).all()) and bool((std == 1).all())):
        return {"format": "official", "preprocessing": "unit"}
    return {"format": "official", "preprocessing": "backbone", "mean": _floats(mean), "std": _floats(std)}


def read_warmup(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A source warm-up's weights by name relative to the ViT, and how it was made: this project's file
    (``imse vida-warmup``: safetensors, the adapters only, its recipe as metadata) or an official checkpoint
    (``.pt``, the whole model, loaded with ``weights_only=True``: no pickled code runs), its names mapped to ours
    and its inputs read from the normaliser it was saved behind, if any (``_trained_inputs``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no ViDA warm-up checkpoint at {path} (make one: python -m imse vida-warmup)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != WARMUP_FORMAT:
            raise ValueError(
                f"{path} is not a ViDA warm-up ({WARMUP_FORMAT}); its format is {metadata.get('format')!r}"
            )
        return load_file(str(path)), metadata
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = {_official_key(key): value for key, value in state.items()}
    return state, _trained_inputs(state, path)


def load_warmup(vit: nn.Module, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> list[str]:
    """Load a warm-up into an injected ViT: every adapter must be in it (with the ViT's ranks); the ViT's own
    weights are loaded too where it has them (the official file holds the whole model). Returns the names loaded."""
    own = vit.state_dict()
    missing = [name for name in adapter_names(vit) if name not in state]
    if missing:
        raise ValueError(f"{source} has no weights for {len(missing)} of the adapters (e.g. {missing[0]})")
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{source} has weights this ViT lacks (e.g. {unknown[0]}): another architecture?")
    wrong = [f"{name} {tuple(state[name].shape)} vs {tuple(own[name].shape)}" for name in state
             if state[name].shape != own[name].shape]  # fmt: skip
    if wrong:
        raise ValueError(f"{source} does not fit this ViT (other ranks or width?): {wrong[0]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
    return sorted(state)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def cotta_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CoTTA's augmentation (the official ``get_tta_transforms``), one random draw for the whole batch, on float
    images in [0, 1]: colour jitter with gamma in random order, edge padding, a random affine, Gaussian blur,
    centre crop, horizontal flip, Gaussian noise (std 0.005), clip. Gamma sees the image clamped to [1e-8, 1], as
    the official ``ColorJitterPro`` (cotta_transforms.py 110). The padding (half the side) and the crop (the side)
    follow the input's size; the official code fixes them at 224 (112 and 224: vida.py 16-17, 32, 42), which is
    the same on 224 px images and undefined on others (its crop would be 224 px whatever the model's input)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    size = x.shape[-1]
    x = x.clamp(0, 1)
    jitters = [
        lambda t: TF.adjust_brightness(t, _uniform(generator, 0.6, 1.4)),
        lambda t: TF.adjust_contrast(t, _uniform(generator, 0.7, 1.3)),
        lambda t: TF.adjust_saturation(t, _uniform(generator, 0.5, 1.5)),
        lambda t: TF.adjust_hue(t, _uniform(generator, -0.06, 0.06)),
        lambda t: TF.adjust_gamma(t.clamp(1e-8, 1), _uniform(generator, 0.7, 1.3)),  # the official clamp
    ]
    for index in torch.randperm(len(jitters), generator=generator).tolist():
        x = jitters[index](x)
    pad = size // 2
    x = TF.pad(x, [pad, pad, pad, pad], padding_mode="edge")
    shift = x.shape[-1] / 16
    angle = _uniform(generator, -15, 15)
    translate = [round(_uniform(generator, -shift, shift)), round(_uniform(generator, -shift, shift))]
    scale = _uniform(generator, 0.9, 1.1)
    x = TF.affine(x, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                  interpolation=InterpolationMode.BILINEAR)  # fmt: skip
    sigma = _uniform(generator, 0.001, 0.5)
    x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[sigma, sigma])
    x = TF.center_crop(x, [size, size])
    if float(torch.rand((), generator=generator)) < 0.5:
        x = TF.horizontal_flip(x)
    x = x + 0.005 * torch.randn(x.shape, generator=generator).to(x.device)
    return x.clamp(0, 1)


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per sample: ``−½ Σ softmax(t)·log_softmax(s) − ½ Σ softmax(s)·log_softmax(t)``."""
    return -0.5 * (teacher.softmax(-1) * student.log_softmax(-1)).sum(-1) - 0.5 * (
        student.softmax(-1) * teacher.log_softmax(-1)
    ).sum(-1)


@torch.no_grad()
def _normalisation(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std ``model`` normalises its images with, read from its ``normalize`` on a black and a white
    image (whatever wraps the backbone); a model without one: mean 0, std 1."""
    if not hasattr(model, "normalize"):
        return torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
    device = next(model.parameters()).device
    black, white = (model.normalize(torch.full((1, channels, 1, 1), value, device=device)).double().flatten().cpu()
                    for value in (0.0, 1.0))  # fmt: skip
    std = 1 / (white - black)
    return -black * std, std


class ViDA(TTAMethod):
    name = "vida"
    label = "ViDA"
    coupled_rates = ("adapter_lr",)
    paper_requires = {
        "checkpoint": "ViDA's official run starts from its source warm-up (--checkpoint vida=FILE: the official "
        "'source ViDA model' or one made by `python -m imse vida-warmup --preprocessing unit`)"
    }

    @classmethod
    def paper_settings(cls, scenario: str) -> dict[str, Any]:
        return {"preprocessing": "unit"}  # the official run feeds its bare timm ViT [0, 1] images

    defaults = {
        "lr": 5e-7,  # the ViT's own weights
        "adapter_lr": 2e-7,
        "momentum": 0.9,
        "ema": 0.999,
        "adapter_ema": 0.8,
        "augmentations": 10,
        "uncertainty_threshold": 0.2,
        "low_rank": 1,
        "high_rank": 128,
        "scale_high_follows": False,  # the official set_scale never sets the high-rank scale
        "seed": 0,
        # the source warm-up the official run starts from (its README's "source ViDA model"); None: the adapters
        # start as initialised (up-projections zero), and ViDA then answers as Source
        "checkpoint": None,
    }

    def configure(self, model: nn.Module) -> dict[str, nn.Parameter]:
        inject_adapters(model, self.hparams["low_rank"], self.hparams["high_rank"])
        if self.hparams["checkpoint"] is not None:
            checkpoint = str(self.hparams["checkpoint"])
            state, made = read_warmup(checkpoint)
            self._check_inputs(model, made, checkpoint)
            load_warmup(find_vit(model)[1], state, checkpoint)
        model.requires_grad_(True)
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self._teacher_initial = copy.deepcopy(self.teacher.state_dict())
        self.generator = torch.Generator().manual_seed(int(self.hparams["seed"]))
        # student and teacher adapters share the scales; each teacher weight follows its student's at its EMA rate
        self._adapters = [m for net in (model, self.teacher) for m in net.modules() if isinstance(m, DomainAdapters)]
        teacher = dict(self.teacher.named_parameters())
        rate = {True: self.hparams["adapter_ema"], False: self.hparams["ema"]}
        self._ema_pairs = [(teacher[name], p, rate[self.is_adapter(name)]) for name, p in model.named_parameters()]
        return dict(model.named_parameters())

    def _check_inputs(self, model: nn.Module, made: dict[str, str], checkpoint: str) -> None:
        """A warm-up fits the inputs it saw: refused when this run feeds others (another preprocessing, or a
        normalisation with other statistics than the file's normaliser holds)."""
        trained = made.get("preprocessing", "backbone")
        if trained != self.hparams["preprocessing"]:
            raise ValueError(f"{checkpoint} was trained with preprocessing={trained!r}; this ViDA runs with "
                             f"{self.hparams['preprocessing']!r} (a warm-up fits the inputs it saw)")  # fmt: skip
        if trained != "backbone" or "mean" not in made:
            return
        theirs = [
            torch.tensor([float(v) for v in made[key].split(",")], dtype=torch.float64) for key in ("mean", "std")
        ]
        own = _normalisation(model, len(theirs[0]))
        if any(a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(own, theirs)):
            shown = [", ".join(f"{v:.4g}" for v in values.tolist()) for values in (*theirs, *own)]
            raise ValueError(f"{checkpoint} was trained on images normalised with mean ({shown[0]}) and std "
                             f"({shown[1]}); the backbone's own: mean ({shown[2]}), std ({shown[3]})")  # fmt: skip

    @staticmethod
    def is_adapter(name: str) -> bool:
        return any(f".{part}." in f".{name}" for part in ("down_low", "up_low", "down_high", "up_high"))

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        names = {id(p): name for name, p in self.trainable.items()}
        adapters = [p for p in params if self.is_adapter(names[id(p)])]
        others = [p for p in params if not self.is_adapter(names[id(p)])]
        groups = [{"params": others, "lr": self.hparams["lr"]}, {"params": adapters, "lr": self.hparams["adapter_lr"]}]
        return torch.optim.SGD(groups, lr=self.hparams["lr"], momentum=self.hparams["momentum"], nesterov=True)

    def num_adapter_values(self) -> int:
        """The adapters' own values (what ViDA adds to the ViT; the ViT's weights train too)."""
        return sum(p.numel() for name, p in self.trainable.items() if self.is_adapter(name))

    def _set_scales(self, uncertainty: float) -> tuple[float, float]:
        """The adapters' scales from the uncertainty, on student and teacher; returns those applied (low, high)."""
        high, low = (1 + uncertainty, 1 - uncertainty)
        if uncertainty < self.hparams["uncertainty_threshold"]:
            high, low = low, high
        if not self.hparams["scale_high_follows"]:
            high = 1.0  # the official set_scale never reaches it
        for module in self._adapters:
            module.scale_low, module.scale_high = low, high
        return low, high

    @torch.enable_grad()
    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.no_grad():
            # the teacher's forwards under the method's precision too (``run_model``); its logits come back float32
            views = [self.run_model(cotta_augment(x, self.generator), self.teacher)
                     for _ in range(self.hparams["augmentations"])]  # fmt: skip
            uncertainty = float(torch.stack(views).var(dim=0).mean()) * 0.1
            low, high = self._set_scales(uncertainty)
            teacher = self.run_model(x, self.teacher)
        student = self.run_model(x)
        loss = symmetric_cross_entropy(student, teacher).mean()
        record: dict[str, Any] = {"entropy": float(-(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()),
                                  "loss": float(loss.detach()), "uncertainty": uncertainty, "scale_low": low,
                                  "scale_high": high,
                                  "updated": False, "skip_reason": None}  # fmt: skip
        if not math.isfinite(record["loss"]):
            record["skip_reason"] = "non-finite loss"
            return teacher, record
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_teacher()
        record["updated"] = True
        return teacher, record

    @torch.no_grad()
    def _update_teacher(self) -> None:
        for teacher, student, alpha in self._ema_pairs:
            teacher.mul_(alpha).add_(student, alpha=1 - alpha)

    def reset_state(self) -> None:
        self.teacher.load_state_dict(self._teacher_initial)
        self.generator.manual_seed(int(self.hparams["seed"]))
        for module in self._adapters:
            module.scale_low = module.scale_high = 1.0
