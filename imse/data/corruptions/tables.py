"""Severity tables of the corruptions, one per image resolution, taken from Hendrycks' generators.

``IMAGENET``: ``ImageNet-C/create_c/make_imagenet_c.py`` (224 px). ``CIFAR``: ``make_cifar_c.py`` (32 px).
Pixel-unit parameters (blur radii, displacements) belong to their resolution: ImageNet-C values destroy a
32 px image. Each entry lists severities 1..5.

Exceptions, kept on purpose:
- ``spatter`` follows ``corrupt-tta``'s smooth-mask formulation (threshold, blur σ, blend strength) in both
  tables; Hendrycks' water/mud spatter relies on Canny edges and a distance transform. It is a validation-only
  corruption (used to pick hyper-parameters), never a test domain.
- ``elastic_transform`` keeps ImageNet-C's ``244 ·`` factors (a typo in the original, "but ultimately nothing is
  incorrect"): the published dataset was made with them.
"""

from __future__ import annotations

import math

__all__ = ["CIFAR", "IMAGENET", "TABLES"]


def _arange(start: float, stop: float, step: float) -> tuple[float, ...]:
    """``np.arange(start, stop, step)`` for zoom factors, with numpy's length rule ``ceil((stop - start) / step)``
    (so ``np.arange(1, 1.11, 0.01)`` has 12 values, ending at 1.11, as in the original)."""
    return tuple(start + k * step for k in range(math.ceil((stop - start) / step)))


IMAGENET: dict[str, tuple] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": (
        _arange(1, 1.11, 0.01),
        _arange(1, 1.16, 0.01),
        _arange(1, 1.21, 0.02),
        _arange(1, 1.26, 0.02),
        _arange(1, 1.31, 0.03),
    ),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    "spatter": ((0.80, 1.0, 0.35), (0.75, 1.2, 0.45), (0.70, 1.5, 0.55), (0.67, 1.8, 0.65), (0.64, 2.2, 0.75)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
    "elastic_transform": (
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    ),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}

CIFAR: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": (
        _arange(1, 1.06, 0.01),
        _arange(1, 1.11, 0.01),
        _arange(1, 1.16, 0.01),
        _arange(1, 1.21, 0.01),
        _arange(1, 1.26, 0.01),
    ),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "spatter": IMAGENET["spatter"],
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "elastic_transform": (
        (32 * 0, 32 * 0, 32 * 0.08),
        (32 * 0.05, 32 * 0.2, 32 * 0.07),
        (32 * 0.08, 32 * 0.06, 32 * 0.06),
        (32 * 0.1, 32 * 0.04, 32 * 0.05),
        (32 * 0.1, 32 * 0.03, 32 * 0.03),
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}

TABLES = {"imagenet": IMAGENET, "cifar": CIFAR}
