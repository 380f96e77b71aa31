"""Digital corruptions: brightness, contrast, (validation) saturation, elastic warps, pixelation, JPEG."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from imse.data.corruptions.ops import Draws, box_resize_matrix, gaussian_filter, hsv_to_rgb, rgb_to_hsv

__all__ = ["brightness", "contrast", "elastic_transform", "jpeg_compression", "pixelate", "saturate"]


def brightness(images: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Brighter light: value channel (HSV) raised by ``c``.

    With hue and saturation fixed, every channel is proportional to V (``rgb = V · f(H, S)``), so the HSV round
    trip is a per-pixel scale ``min(V + c, 1) / V``; black pixels (V = 0, S = 0) become grey ``min(c, 1)``.
    V has 256 levels, so the scale is a 256-entry table; works on the uint8 images directly.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255
    raised = (levels + c).clamp(max=1.0)
    scale = torch.where(levels > 0, raised / levels.clamp(min=1e-12), torch.zeros_like(levels)).float()
    value = images.amax(dim=-3, keepdim=True).long()
    out = images.to(torch.float32).mul_(scale.to(images.device)[value])
    out = out.add_(1e-3).clamp_(0, 255).to(torch.uint8)
    black = int(min(c, 1.0) * 255 + 1e-3)
    return torch.where(value == 0, torch.full_like(images, black), out)


brightness.works_on_uint8 = True


def saturate(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Colour saturation scaled by ``c[0]`` and raised by ``c[1]`` (HSV)."""
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(-3)
    return hsv_to_rgb(torch.stack((h, (s * c[0] + c[1]).clamp(0, 1), v), dim=-3))


def contrast(images: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Lower contrast: each channel pulled towards its image mean by the factor ``c``:
    ``(x − m)·c + m = x·c + m·(1 − c)``, computed in place on the 0..255 scale (works on uint8 directly)."""
    x = images.to(torch.float32)
    means = x.mean(dim=(-2, -1), keepdim=True)
    return x.mul_(c).add_(means * (1 - c)).add_(1e-3).clamp_(0, 255).to(torch.uint8)


contrast.works_on_uint8 = True


def _affine_grids(points_from: torch.Tensor, points_to: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sampling grid (``grid_sample``, corner-aligned) of ``cv2.warpAffine(M)`` with
    ``M = cv2.getAffineTransform(points_from, points_to)``: output pixel ``p`` reads input ``M⁻¹ p``."""
    b = points_from.shape[0]
    ones = torch.ones(b, 3, 1, dtype=torch.float64, device=points_from.device)
    forward = torch.linalg.solve(torch.cat((points_from, ones), -1), points_to).transpose(1, 2)  # [b, 2, 3]
    square = torch.cat((forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(b, 1, 3)), 1)
    inverse = torch.linalg.inv(square)[:, :2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pixels = torch.stack((xs, ys, torch.ones_like(xs)), -1).view(1, h * w, 3)
    source = pixels @ inverse.transpose(1, 2)  # [b, h*w, 2] as (x, y)
    sx = source[..., 0] * 2 / max(w - 1, 1) - 1
    sy = source[..., 1] * 2 / max(h - 1, 1) - 1
    return torch.stack((sx, sy), -1).view(b, h, w, 2)


def elastic_transform(x: torch.Tensor, c: tuple, draws: Draws, table: str) -> torch.Tensor:
    """Elastic warp: a random affine (three control points moved by up to ``c[2]`` px; OpenCV bilinear,
    BORDER_REFLECT_101), then a smooth random displacement field (uniform noise blurred with σ ``c[1]``, scaled
    by ``c[0]``; scipy ``map_coordinates`` order 1, mode ``reflect``)."""
    alpha, sigma, affine = c
    b, _, h, w = x.shape
    # ImageNet-C takes (h//2, w//2) as the centre and hands it to OpenCV as an (x, y) point; kept as is.
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float64)
    # min(h, w) // 3 is 0 below 3 px: three coincident points, a singular system. 1 px keeps the smallest
    # images (2 px sides) warpable and changes nothing from 3 px up.
    size = max(1, min(h, w) // 3)
    base = torch.stack((centre + size, torch.stack((centre[0] + size, centre[1] - size)), centre - size))
    moved = base + draws.uniform((b, 3, 2), -affine, affine).double().cpu()
    grid = _affine_grids(base.expand(b, 3, 2), moved, h, w).to(device=x.device, dtype=x.dtype)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

    fields = draws.uniform((b, 2, h, w), -1.0, 1.0)
    fields = gaussian_filter(fields, sigma, mode="reflect", truncate=3.0) * alpha if sigma > 0 else fields * alpha
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=x.dtype), torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij"
    )
    sx = (xs + fields[:, 0]) * 2 / w + 1 / w - 1  # pixel -> grid_sample coordinate (align_corners=False)
    sy = (ys + fields[:, 1]) * 2 / h + 1 / h - 1
    grid = torch.stack((sx, sy), -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _pil_box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL ``resize(BOX)`` of 8-bit images (values on the 0..255 scale): horizontal pass, round, vertical pass,
    round, as PIL does. Each pass is one GEMM with the resampling matrix."""
    h, w = x.shape[-2:]
    if width != w:
        x = (x @ box_resize_matrix(w, width, x.device).T).add_(0.5).floor_()
    if height != h:
        x = (box_resize_matrix(h, height, x.device) @ x).add_(0.5).floor_()
    return x


def pixelate(images: torch.Tensor, c: float, draws: Draws, table: str) -> torch.Tensor:
    """Low resolution: box-downsample to ``int(size · c)`` and box-upsample back (PIL BOX, as the original).
    Works on the uint8 images directly (values stay integers between passes, as in PIL)."""
    h, w = images.shape[-2:]
    small = _pil_box_resize(images.to(torch.float32), max(1, int(h * c)), max(1, int(w * c)))
    return _pil_box_resize(small, h, w).clamp_(0, 255).to(torch.uint8)


pixelate.works_on_uint8 = True


def jpeg_compression(images: torch.Tensor, c: int, draws: Draws, table: str) -> torch.Tensor:
    """JPEG at quality ``c`` (libjpeg through torchvision, nvJPEG for CUDA tensors; 4:2:0 like PIL). Works on
    the uint8 images directly: the codec is per image by nature."""
    with warnings.catch_warnings():
        # torchvision 0.29 flags its codecs as deprecated in favour of torchcodec; they remain the fastest
        # batched libjpeg/nvJPEG path available here.
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        encoded = [data.cpu() for data in encode_jpeg(list(images), quality=int(c))]
        return torch.stack(decode_jpeg(encoded, device=images.device))


jpeg_compression.works_on_uint8 = True
