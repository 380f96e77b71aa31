"""Blur corruptions: defocus, frosted glass, camera motion, zoom, and plain Gaussian blur."""

from __future__ import annotations

import numpy as np
import torch

from imse.data.corruptions.ops import (
    Draws,
    clipped_zoom,
    correlate2d,
    disk_kernel,
    gaussian_filter,
    imagemagick_motion_blur,
)

__all__ = ["defocus_blur", "gaussian_blur", "glass_blur", "motion_blur", "zoom_blur"]


def gaussian_blur(x: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """``skimage.filters.gaussian(sigma=c)``: separable, border mode ``nearest``, truncated at 4σ."""
    return gaussian_filter(x, c, mode="nearest")


def defocus_blur(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Out-of-focus lens: correlation with an anti-aliased disk of radius ``c[0]`` (OpenCV borders)."""
    radius, alias_blur = c
    return correlate2d(x, disk_kernel(radius, alias_blur), mode="mirror")


def _sweep_sources(h: int, w: int, delta: int, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Which input pixel each output pixel shows after ImageNet-C's glass-blur sweep, for a batch at once.

    The original visits rows ``h - delta`` down to ``delta + 1`` and, in each, columns ``w - delta`` down to
    ``delta + 1``, and writes ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with ``(h', w')`` at a random offset in
    ``[-delta, delta)``. On numpy views that tuple assignment is not a swap: ``x[h, w]`` takes the value of
    ``x[h', w']`` and ``x[h', w']`` gets its own value back. So each visited pixel *copies* a neighbour as it is
    at that moment (possibly already overwritten: the order matters). This is what ImageNet-C and CIFAR-10-C
    contain. The copies depend only on positions, so they are replayed on an index array, one vectorised step
    per position for the whole batch; returns ``[b, h·w]`` source indices.
    """
    b = dy.shape[0]
    source = np.tile(np.arange(h * w, dtype=np.int64)[:, None], (1, b))  # [positions, batch]
    images = np.arange(b)
    step = 0
    for row in range(h - delta, delta, -1):
        for col in range(w - delta, delta, -1):
            there = (row + dy[:, step]) * w + (col + dx[:, step])
            source[row * w + col] = source[there, images]
            step += 1
    return source.T


def glass_blur(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Frosted glass: Gaussian blur, quantise to 8 bits (as the original), ``c[2]`` sweeps in which pixels copy
    random neighbours (ImageNet-C's exact sequential sweep, see ``_sweep_sources``), blur again."""
    sigma, delta, iterations = c
    b, channels, h, w = x.shape
    x = torch.floor(gaussian_filter(x, sigma) * 255 + 1e-3) / 255
    steps = max(0, h - 2 * delta) * max(0, w - 2 * delta)
    for _ in range(iterations):
        if steps == 0:
            break
        dx = draws.randint(-delta, delta, (b, steps)).cpu().numpy()
        dy = draws.randint(-delta, delta, (b, steps)).cpu().numpy()
        perm = torch.from_numpy(_sweep_sources(h, w, delta, dy, dx)).to(x.device)
        flat = x.reshape(b, channels, h * w)
        x = flat.gather(2, perm[:, None, :].expand(b, channels, h * w)).reshape(b, channels, h, w)
    return gaussian_filter(x, sigma)


def motion_blur(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Camera shake: ImageMagick's motion blur (radius ``c[0]``, σ ``c[1]``) at a random angle in [-45°, 45°]
    per image. The original reads the result back as an 8-bit PNG, whose values ImageMagick truncates."""
    radius, sigma = c
    angles = draws.uniform((x.shape[0],), -45.0, 45.0)
    return torch.floor(imagemagick_motion_blur(x, radius, sigma, angles) * 255 + 1e-3) / 255


def zoom_blur(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Zooming during exposure: the mean of the image and its centre zooms by each factor in ``c``."""
    out = torch.zeros_like(x)
    for factor in c:
        out += clipped_zoom(x, factor)
    return (x + out) / (len(c) + 1)
