"""Noise corruptions: every pixel and channel draws its own random value, every image its own noise."""

from __future__ import annotations

import torch

from imse.data.corruptions.ops import Draws

__all__ = ["gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise"]


def gaussian_noise(x: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Additive Gaussian noise of std ``c``."""
    return x + draws.normal(x.shape, std=c)


def shot_noise(x: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Poisson (photon) noise: ``Poisson(x · c) / c``; fewer photons (smaller ``c``) means more noise."""
    return draws.poisson(x * c) / c


def impulse_noise(images: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """ImageNet-C's impulse noise, which Hendrycks' generator makes as skimage's salt-and-pepper
    (``skimage.util.random_noise(mode='s&p', amount=c)``): each value is replaced with probability ``c``, half of
    them by 255, half by 0. Works on the uint8 images directly (no arithmetic)."""
    u = draws.uniform(images.shape)
    # u < c: replaced (probability c); among those, u < c/2: salt — independent halves, as two draws would be.
    salt = (u < c / 2).to(torch.uint8).mul_(255)
    return torch.where(u < c, salt, images)


impulse_noise.works_on_uint8 = True


def speckle_noise(x: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Multiplicative noise: ``x + x · N(0, c)``."""
    return x + x * draws.normal(x.shape, std=c)
