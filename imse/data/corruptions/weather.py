"""Weather corruptions: snow, frost, fog, and (validation) spatter."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from imse.core.resources import asset_path
from imse.data.corruptions.ops import (
    Draws,
    clipped_zoom,
    gaussian_filter,
    imagemagick_motion_blur,
    opencv_gaussian_blur,
    plasma_fractal,
    rgb_to_gray,
)

__all__ = ["FROST_FILES", "fog", "frost", "snow", "spatter"]

# The six textures corrupt-tta ships; ImageNet-C's generators draw from the first five (np.random.randint(5)).
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_DRAWN = 5
# make_cifar_c.py shrinks the textures to a fifth (cv2.resize, bilinear) before cropping 32 px.
FROST_TEXTURE_SCALE = {"imagenet": 1.0, "cifar": 0.2}


def snow(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Falling snow: thresholded, zoomed Gaussian flakes smeared by a motion blur at a random angle in
    [-135°, -45°], added twice (once rotated by 180°) over a greyed, brightened image."""
    loc, scale, zoom, threshold, radius, sigma, blend = c
    b, _, h, w = x.shape
    flakes = draws.normal((b, 1, h, w), mean=loc, std=scale)
    flakes = clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    flakes = torch.floor(flakes.clamp(0, 1) * 255) / 255  # the original goes through an 8-bit PNG here
    angles = draws.uniform((b,), -135.0, -45.0)
    flakes = torch.floor(imagemagick_motion_blur(flakes, radius, sigma, angles) * 255 + 1e-3) / 255
    x = blend * x + (1 - blend) * torch.maximum(x, rgb_to_gray(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


@lru_cache(maxsize=8)
def _frost_textures(scale: float, device: str) -> tuple[torch.Tensor, ...]:
    import numpy as np
    from PIL import Image

    textures = []
    for name in FROST_FILES:
        with Image.open(asset_path("frost", name)) as image:
            rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
        texture = rgb.permute(2, 0, 1).float()
        if scale != 1.0:
            h, w = texture.shape[-2:]
            size = (round(h * scale), round(w * scale))
            texture = F.interpolate(texture[None], size=size, mode="bilinear", align_corners=False)[0].round()
        textures.append(texture.to(device))
    return tuple(textures)


def frost(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Frost on the lens: ``c[0] · image + c[1] · texture``, a random crop of a random frost texture per image.

    Textures smaller than the image are first enlarged (bilinear) to cover it, as corrupt-tta does.
    """
    image_weight, frost_weight = c
    b, _, h, w = x.shape
    textures = _frost_textures(FROST_TEXTURE_SCALE[table], str(x.device))
    choice = draws.randint(0, FROST_DRAWN, (b,)).tolist()
    crops = []
    for i in choice:
        texture = textures[i]
        th, tw = texture.shape[-2:]
        if th < h or tw < w:
            factor = max(h / th, w / tw)
            size = (math.ceil(th * factor), math.ceil(tw * factor))
            texture = F.interpolate(texture[None], size=size, mode="bilinear", align_corners=False)[0]
            th, tw = size
        top = int(draws.randint(0, max(1, th - h), (1,)))
        left = int(draws.randint(0, max(1, tw - w), (1,)))
        crops.append(texture[:, top : top + h, left : left + w])
    return image_weight * x + frost_weight * torch.stack(crops) / 255


def fog(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Fog: a diamond-square plasma (roughness ``c[1]``) added with strength ``c[0]``, then rescaled so the
    brightest value keeps its level."""
    strength, decay = c
    b, _, h, w = x.shape
    mapsize = 1 << max(1, math.ceil(math.log2(max(h, w))))
    plasma = plasma_fractal(b, mapsize, decay, draws)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * plasma) * peak / (peak + strength)


def spatter(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Mud spatter (corrupt-tta's formulation): smooth random blobs above a threshold, softened, blended
    towards mud brown with strength ``c[2]``."""
    threshold, sigma, blend = c
    b, _, h, w = x.shape
    liquid = gaussian_filter(draws.normal((b, 1, h, w)), sigma, mode="reflect")
    liquid = liquid - liquid.amin(dim=(-2, -1), keepdim=True)
    liquid = liquid / (liquid.amax(dim=(-2, -1), keepdim=True) + 1e-8)
    mask = opencv_gaussian_blur((liquid > threshold).to(x.dtype), max(0.5, sigma / 2.0)).clamp(0, 1)
    mud = torch.tensor([63.0, 42.0, 20.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) / 255
    return x * (1 - blend * mask) + mud * (blend * mask)
