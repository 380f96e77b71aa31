"""``python -m imse train-builtin``: train the built-in offline ViT on Fashion-MNIST and export its assets.

The result (``assets/builtin``) is what the app, the CLI and CI use when nothing can be downloaded: the weights
(safetensors), their config (architecture, normalisation, class names), a compressed copy of the test split
for streams, a clean training sample for the source-domain descriptor, and a model card.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imse.core.images import as_float_images
from imse.data.fashion_mnist import CLASS_NAMES, load_idx_split, to_rgb32
from imse.data.models import build_builtin_vit

__all__ = ["ARCHITECTURE", "evaluate", "train_builtin"]

# ~1 M parameters (3.9 MB in float32): small enough to adapt on two CPU cores, deep enough (6 blocks) for IMSE to
# adapt three and keep three for the diversity loss.
ARCHITECTURE = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 3.0,
    "num_classes": 10,
}


def _normalisation(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = as_float_images(images)
    mean = x.mean().item()
    std = x.std().item()
    return [mean] * 3, [std] * 3


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crop of the 4-px zero-padded image and horizontal flip, per image (on the batch's device)."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    offsets = torch.randint(0, 9, (b, 2), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    rows = (torch.arange(32)[None, :] + offsets[:, :1]).to(x.device)
    cols = (torch.arange(32)[None, :] + offsets[:, 1:]).to(x.device)
    cols = torch.where(flips.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


Normalise = Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> the model's input


def _normaliser(mean: list[float], std: list[float], device) -> Normalise:
    """uint8 images (on any device) -> the model's input on ``device``, normalised with the training set's
    statistics: one rule for training and evaluation."""
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (as_float_images(images.to(device)) - mean_t) / std_t

    return normalise


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalise: Normalise) -> float:
    """Top-1 accuracy of ``model`` on uint8 images, fed through ``normalise`` (``_normaliser``)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        logits = model(normalise(images[start : start + 1000]))
        correct += (logits.argmax(1).cpu() == labels[start : start + 1000]).sum().item()
    return correct / len(labels)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class _Splits:
    """Fashion-MNIST as read (uint8 28×28: what the exported files hold), optionally its first ``limit`` images."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @classmethod
    def load(cls, data_dir: str | None, limit: int | None) -> _Splits:
        train, test = load_idx_split("train", data_dir), load_idx_split("test", data_dir)
        if limit:
            train, test = (train[0][:limit], train[1][:limit]), (test[0][:limit], test[1][:limit])
        return cls(train, test)

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split as the model sees it: RGB 32×32 uint8 images and int64 labels."""
        images, labels = getattr(self, split)
        return to_rgb32(images), torch.as_tensor(labels, dtype=torch.int64)


@dataclass(frozen=True)
class _Schedule:
    """The optimiser's steps: ``epochs`` passes over ``samples`` images in batches, the rate warmed up then cosine."""

    peak: float
    epochs: int
    batch_size: int
    samples: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def lr(self, step: int) -> float:
        total = self.epochs * self.steps_per_epoch
        return _lr_at(step, total, min(total // 10, 5 * self.steps_per_epoch), self.peak)


@dataclass
class _Training:
    """What training carries from step to step, saved after every epoch so that an interrupted run resumes where
    it stopped with the same draws (the generator's state included)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0  # epochs done
    elapsed: float = 0.0  # training seconds so far (evaluations excluded)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.epoch, self.elapsed = int(state["epoch"]), float(state["elapsed"])

    def save(self, path: Path) -> None:
        """Written to a temporary file, then renamed: an interruption never leaves half a state."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "elapsed": self.elapsed,
        }
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)


def _train_epoch(
    training: _Training,
    schedule: _Schedule,
    train: tuple[torch.Tensor, torch.Tensor],
    normalise: Normalise,
) -> float:
    """One pass over the shuffled, augmented training images; returns the loss's running mean at its end."""
    from tqdm import tqdm

    model, optimizer, generator = training.model, training.optimizer, training.generator
    images, labels = train
    started = time.perf_counter()
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    steps, batch_size = schedule.steps_per_epoch, schedule.batch_size
    progress = tqdm(range(steps), desc=f"epoch {training.epoch + 1}/{schedule.epochs}", leave=False)
    running = 0.0
    for i in progress:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(training.epoch * steps + i)
        index = order[i * batch_size : (i + 1) * batch_size].to(images.device)
        logits = model(normalise(_augment(images[index], generator)))
        loss = F.cross_entropy(logits, labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.9 * running + 0.1 * loss.item() if i else loss.item()
        progress.set_postfix(loss=f"{running:.3f}")
    training.elapsed += time.perf_counter() - started
    training.epoch += 1
    return running


def train_builtin(
    *,
    data_dir: str | None = None,
    out_dir: str = "assets/builtin",
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    device: str = "cpu",
    seed: int = 0,
    resume: bool = True,
    limit: int | None = None,
    sample_size: int = 2000,
) -> dict:
    """Train (or resume) and export. ``limit`` trains/evaluates on the first N images only (for tests).

    Returns the summary written into the model card.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    splits = _Splits.load(data_dir, limit)
    x_train, y_train = splits.tensors("train")
    x_test, y_test = splits.tensors("test")
    mean, std = _normalisation(x_train)
    normalise = _normaliser(mean, std, device)

    torch.manual_seed(seed)
    model = build_builtin_vit({"architecture": ARCHITECTURE}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    training = _Training(model, optimizer, torch.Generator().manual_seed(seed))
    schedule = _Schedule(lr, epochs, batch_size, samples=len(y_train))
    if resume and state_path.exists():
        training.load(state_path)
        print(f"resuming from {state_path} after epoch {training.epoch}")

    train = (x_train.to(device), y_train.to(device))
    while training.epoch < epochs:
        running = _train_epoch(training, schedule, train, normalise)
        accuracy = evaluate(model, x_test, y_test, normalise)
        print(f"epoch {training.epoch}/{epochs}: loss {running:.3f}, test accuracy {accuracy:.4f}, "
              f"{training.elapsed:.0f} s")  # fmt: skip
        training.save(state_path)

    accuracy = evaluate(model, x_test, y_test, normalise)
    summary = _export(model.cpu(), out, mean=mean, std=std, accuracy=accuracy, elapsed=training.elapsed, epochs=epochs,
                      batch_size=batch_size, lr=lr, device=device, seed=seed, limit=limit)  # fmt: skip
    _save_data(out, splits, seed=seed, sample_size=sample_size)
    return summary


def _save_data(out: Path, splits: _Splits, *, seed: int, sample_size: int) -> None:
    """The test split for streams, and a seeded sample of clean training images for the source descriptor."""
    (train_images, train_labels), (test_images, test_labels) = splits.train, splits.test
    rng = np.random.RandomState(seed)
    sample = rng.choice(len(train_labels), size=min(sample_size, len(train_labels)), replace=False)
    np.savez_compressed(out / "test.npz", images=test_images, labels=test_labels)
    np.savez_compressed(out / "train_sample.npz", images=train_images[sample], labels=train_labels[sample])


def _export(model, out: Path, *, mean, std, accuracy, elapsed, epochs, batch_size, lr, device, seed, limit) -> dict:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {
        "architecture": ARCHITECTURE,
        "mean": mean,
        "std": std,
        "input_size": 32,
        "class_names": CLASS_NAMES,
        "dataset": "Fashion-MNIST (28x28 grey, zero-padded to 32x32, replicated to RGB)",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    device_name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor()
    summary = {
        "test_accuracy": accuracy,
        "train_seconds": round(elapsed, 1),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "device": f"{device} ({device_name or 'cpu'})",
        "seed": seed,
        "limit": limit,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    limited = f" (first {limit} images only)" if limit else ""
    arch = ", ".join(f"{k}={v}" for k, v in ARCHITECTURE.items())
    card = f"""# Built-in backbone: a small ViT on Fashion-MNIST

- **Architecture**: timm `VisionTransformer` ({arch}), {summary["parameters"]:,} parameters.
- **Data**: Fashion-MNIST (Zalando, MIT; Debian package `dataset-fashion-mnist`), 60k training images; 28×28
  grey images zero-padded to 32×32 and replicated to 3 channels. Normalisation mean {mean[0]:.4f}, std
  {std[0]:.4f} (training set, after padding). Augmentation: random crop (4-px padding) and horizontal flip.
- **Training**: `python -m imse train-builtin --epochs {epochs} --batch-size {batch_size} --lr {lr} --device
  {device} --seed {seed}`: AdamW (weight decay 0.05), {epochs} epochs, warm-up then cosine schedule, label
  smoothing 0.1; {elapsed / 60:.1f} min on {summary["device"]}, torch {torch.__version__}.
- **Clean accuracy** on the full 10,000-image test split: **{accuracy * 100:.2f} %**{limited}.
- **Files**: `model.safetensors` (weights), `config.json` (architecture, normalisation, class names), `test.npz`
  (the test split, uint8 28×28, for streams), `train_sample.npz` (2,000 clean training images for the
  source-domain descriptor).
- **Licence**: MIT (weights and this card); the data is Fashion-MNIST's (MIT).
- **Intended use**: an offline stand-in for ImageNet ViTs in demos, tests and CPU benchmarks of test-time
  adaptation under CIFAR-10-C-style corruptions. Not a fashion classifier for real use.
"""
    (out / "MODEL_CARD.md").write_text(card)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
