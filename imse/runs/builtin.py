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


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, device) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    model.eval()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    correct = 0
    for start in range(0, len(labels), 1000):
        x = as_float_images(images[start : start + 1000].to(device))
        logits = model((x - mean_t) / std_t)
        correct += (logits.argmax(1).cpu() == labels[start : start + 1000]).sum().item()
    return correct / len(labels)


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


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
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    train_images, train_labels = load_idx_split("train", data_dir)
    test_images, test_labels = load_idx_split("test", data_dir)
    if limit:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
        test_images, test_labels = test_images[:limit], test_labels[:limit]
    x_train, y_train = to_rgb32(train_images), torch.as_tensor(train_labels, dtype=torch.int64)
    x_test, y_test = to_rgb32(test_images), torch.as_tensor(test_labels, dtype=torch.int64)
    mean, std = _normalisation(x_train)

    torch.manual_seed(seed)
    model = build_builtin_vit({"architecture": ARCHITECTURE}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = min(total_steps // 10, 5 * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    first_epoch, elapsed = 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        first_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
        print(f"resuming from {state_path} after epoch {first_epoch}")

    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x_train_device = x_train.to(device)
    y_train_device = y_train.to(device)
    for epoch in range(first_epoch, epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        running = 0.0
        for i in progress:
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup, lr)
            index = order[i * batch_size : (i + 1) * batch_size].to(device)
            x = as_float_images(_augment(x_train_device[index], generator))
            logits = model((x - mean_t) / std_t)
            loss = F.cross_entropy(logits, y_train_device[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running = 0.9 * running + 0.1 * loss.item() if i else loss.item()
            progress.set_postfix(loss=f"{running:.3f}")
        elapsed += time.perf_counter() - started
        accuracy = evaluate(model, x_test, y_test, mean, std, device)
        print(f"epoch {epoch + 1}/{epochs}: loss {running:.3f}, test accuracy {accuracy:.4f}, {elapsed:.0f} s")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "epoch": epoch + 1,
                "elapsed": elapsed,
            },
            state_path.with_suffix(".tmp"),
        )
        state_path.with_suffix(".tmp").replace(state_path)

    accuracy = evaluate(model, x_test, y_test, mean, std, device)
    summary = _export(
        model.cpu(),
        out,
        mean=mean,
        std=std,
        accuracy=accuracy,
        elapsed=elapsed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        seed=seed,
        limit=limit,
    )
    rng = np.random.RandomState(seed)
    sample = rng.choice(len(train_labels), size=min(sample_size, len(train_labels)), replace=False)
    np.savez_compressed(out / "test.npz", images=test_images, labels=test_labels)
    np.savez_compressed(out / "train_sample.npz", images=train_images[sample], labels=train_labels[sample])
    return summary


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
