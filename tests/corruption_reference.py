"""Reference corruptions for the fidelity tests: ``corrupt-tta`` where it follows ImageNet-C, and short
per-image numpy restatements of Hendrycks' ``make_imagenet_c.py`` where corrupt-tta departs from it.

Used only by tests. Every function takes one uint8 HxWx3 image and a numpy ``RandomState`` and returns the
uint8 image the original generator would store (``np.uint8`` truncation).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def imagemagick() -> str | None:
    """The real ImageMagick ``convert`` (not a stand-in of the same name elsewhere on PATH)."""
    for candidate in ("convert-im6.q16", "convert-im6", "magick"):
        path = shutil.which(candidate)
        if path:
            return path
    return "/usr/bin/convert" if Path("/usr/bin/convert").exists() else None


def imagemagick_motion_blur(gray_or_rgb: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """What ImageNet-C's Wand ``motion_blur`` returns, through the ImageMagick command line."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp, "in.png"), Path(tmp, "out.png")
        Image.fromarray(gray_or_rgb).save(source)
        subprocess.run(
            [imagemagick(), str(source), "-motion-blur", f"{radius}x{sigma}+{angle}", str(target)], check=True
        )
        return np.asarray(Image.open(target))


def corrupt_tta(image: np.ndarray, name: str, severity: int, rng: np.random.RandomState) -> np.ndarray:
    import corrupt_tta

    np.random.seed(rng.randint(2**31))  # corrupt-tta draws from numpy's global RNG
    return np.uint8(np.clip(corrupt_tta.corrupt(image, severity=severity, corruption_name=name), 0, 255))


def glass_blur(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """Hendrycks' glass blur. Its swap ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` acts on numpy views and so
    copies ``x[h', w']`` into ``x[h, w]`` (the second assignment writes back ``x[h', w']``'s own value); written
    here as that copy. (corrupt-tta performs a true swap, which is not what ImageNet-C contains.)"""
    from skimage.filters import gaussian

    sigma, delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    h, w = image.shape[:2]
    x = np.uint8(gaussian(image / 255.0, sigma=sigma, channel_axis=-1) * 255)
    for _ in range(iterations):
        for row in range(h - delta, delta, -1):
            for col in range(w - delta, delta, -1):
                dx, dy = rng.randint(-delta, delta, size=(2,))
                x[row, col] = x[row + dy, col + dx]
    return np.uint8(np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255)


def motion_blur(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
    return imagemagick_motion_blur(image, radius, sigma, rng.uniform(-45, 45))


def snow(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    import cv2
    from scipy.ndimage import zoom

    loc, scale, factor, threshold, radius, sigma, blend = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ][severity - 1]
    x = image.astype(np.float32) / 255.0
    h = x.shape[0]
    flakes = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    flakes = zoom(flakes[top : top + crop, top : top + crop], factor, order=1)
    trim = (flakes.shape[0] - h) // 2
    flakes = flakes[trim : trim + h, trim : trim + h]
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)
    flakes = imagemagick_motion_blur(flakes, radius, sigma, rng.uniform(-135, -45)) / 255.0
    flakes = flakes[..., np.newaxis]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(h, h, 1)
    x = blend * x + (1 - blend) * np.maximum(x, gray * 1.5 + 0.5)
    return np.uint8(np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255)


def frost(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """Hendrycks' frost: one of the first five textures (``np.random.randint(5)``), a random 224 crop."""
    import cv2

    a, b = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"][rng.randint(5)]
    texture = cv2.imread(str(ROOT / "assets" / "frost" / name))
    h, w = image.shape[:2]
    top, left = rng.randint(0, texture.shape[0] - h), rng.randint(0, texture.shape[1] - w)
    texture = texture[top : top + h, left : left + w][..., [2, 1, 0]]
    return np.uint8(np.clip(a * image + b * texture, 0, 255))


def fog(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """Hendrycks' fog (corrupt-tta forgets to pass the roughness ``c[1]`` to its plasma fractal)."""
    from corrupt_tta.corruptions import plasma_fractal

    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    np.random.seed(rng.randint(2**31))
    x = image / 255.0
    peak = x.max()
    h, w = x.shape[:2]
    x = x + strength * plasma_fractal(mapsize=256, wibbledecay=decay)[:h, :w][..., np.newaxis]
    return np.uint8(np.clip(x * peak / (peak + strength), 0, 1) * 255)


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.RandomState) -> np.ndarray:
    """Hendrycks' elastic transform with ImageNet-C's ``244 ·`` factors (corrupt-tta uses 224)."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, affine = [
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    ][severity - 1]
    x = image.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    centre = np.float32((h, w)) // 2
    size = min(h, w) // 3
    src = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    out = np.stack(
        [map_coordinates(x[..., c], (rows + dy, cols + dx), order=1, mode="reflect").reshape(h, w) for c in range(3)],
        axis=-1,
    )
    return np.uint8(np.clip(out, 0, 1) * 255)


OWN_REFERENCES = {
    "elastic_transform": elastic_transform,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
}


def reference(image: np.ndarray, name: str, severity: int, rng: np.random.RandomState) -> np.ndarray:
    if name in OWN_REFERENCES:
        return OWN_REFERENCES[name](image, severity, rng)
    return corrupt_tta(image, name, severity, rng)
