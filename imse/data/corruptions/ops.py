"""Batched image operations the corruptions are built from, each matching the library the original code used.

Images are float tensors ``[..., H, W]`` (usually ``[B, 3, H, W]`` in [0, 1]) on any device. Where the original
ImageNet-C code called scipy, scikit-image, OpenCV, PIL or ImageMagick, the function here reproduces that
library's conventions (kernel sizes, border modes, coordinate mappings), so the engine can be checked against it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "Draws",
    "box_resize_matrix",
    "clipped_zoom",
    "correlate2d",
    "disk_kernel",
    "gaussian_filter",
    "hsv_to_rgb",
    "imagemagick_motion_blur",
    "opencv_gaussian_blur",
    "pad2d",
    "pad_index",
    "plasma_fractal",
    "rgb_to_gray",
    "rgb_to_hsv",
]


class Draws:
    """Random draws for one batch, from ``generator`` (on its own device) or torch's global RNG.

    Values are drawn where the generator lives and moved to ``device``, so a CPU generator can drive CUDA images
    and the same seed gives the same draws on the same device.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self.source = generator.device if generator is not None else device

    def _out(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def uniform(self, shape, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.source)
        return self._out(u * (high - low) + low)

    def normal(self, shape, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        n = torch.randn(shape, generator=self.generator, device=self.source)
        return self._out(n * std + mean)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """Integers in ``[low, high)`` like ``np.random.randint``."""
        return self._out(torch.randint(low, high, shape, generator=self.generator, device=self.source))

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        if self.source.type != "cpu" or rates.numel() < 1 << 16:
            return self._out(torch.poisson(rates.to(self.source), generator=self.generator))
        # torch's CPU Poisson sampler is serial; sample fixed chunks from seeds drawn here, on all cores.
        # The chunking does not depend on the core count, so the result does not either.
        chunks = rates.reshape(-1).to("cpu").chunk(8)
        seeds = torch.randint(0, 2**62, (len(chunks),), generator=self.generator, device="cpu").tolist()

        def sample(args):
            chunk, seed = args
            return torch.poisson(chunk, generator=torch.Generator().manual_seed(seed))

        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            parts = list(pool.map(sample, zip(chunks, seeds)))
        return self._out(torch.cat(parts).view_as(rates))


# ---------------------------------------------------------------------------------------------------------------
# Borders and separable filters (scipy.ndimage / OpenCV conventions)


def pad_index(n: int, before: int, after: int, mode: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices into a length-``n`` axis for a padded axis of ``before + n + after`` samples.

    Modes, by the library that names them: ``nearest`` (edge value; OpenCV BORDER_REPLICATE), ``reflect``
    (scipy's half-sample symmetric ``dcba|abcd|dcba``), ``mirror`` (whole-sample ``dcb|abcd|cba``; OpenCV's
    default BORDER_REFLECT_101). Pads longer than the axis fold again, as scipy does.
    """
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if n == 1:
        return torch.zeros_like(i)
    if mode == "reflect":
        period = 2 * n
        i = i % period
        return torch.where(i < n, i, period - 1 - i)
    if mode == "mirror":
        period = 2 * n - 2
        i = i % period
        return torch.where(i < n, i, period - i)
    raise ValueError(f"unknown border mode {mode!r}")


_TORCH_PAD_MODE = {"nearest": "replicate", "mirror": "reflect"}


def pad2d(x: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], mode: str) -> torch.Tensor:
    """Pad the last two dims, ``rows`` = (top, bottom) and ``cols`` = (left, right), with a ``pad_index`` border
    mode (``F.pad`` where it has the mode: far faster than a gather along the inner dims)."""
    (top, bottom), (left, right) = rows, cols
    h, w = x.shape[-2:]
    torch_mode = _TORCH_PAD_MODE.get(mode)
    fits = mode != "mirror" or max(top, bottom) < h and max(left, right) < w
    if torch_mode and fits and x.ndim in (3, 4):
        return F.pad(x, (left, right, top, bottom), mode=torch_mode)
    row_index = pad_index(h, top, bottom, mode, device=x.device)
    col_index = pad_index(w, left, right, mode, device=x.device)
    return x.index_select(-2, row_index).index_select(-1, col_index)


@lru_cache(maxsize=64)
def _gaussian_weights(sigma: float, truncate: float) -> tuple[float, ...]:
    # scipy.ndimage._gaussian_kernel1d: radius = int(truncate * sigma + 0.5), weights exp(-x²/2σ²) normalised.
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
    total = sum(weights)
    return tuple(w / total for w in weights)


@lru_cache(maxsize=128)
def _filter_matrix(n: int, weights: tuple[float, ...], mode: str) -> torch.Tensor:
    """The ``n × n`` matrix of a 1-D correlation with a centred odd kernel, border handling folded in:
    ``out = M @ signal``. As one GEMM it is faster than a single-channel convolution on CPU, costs the same for
    any kernel length (elastic_transform's σ = 171 px kernel spans 1025 taps), and handles every border mode."""
    radius = (len(weights) - 1) // 2
    index = pad_index(n, radius, radius, mode)  # padded position -> source sample
    matrix = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for k, weight in enumerate(weights):
        matrix.index_put_((rows, index[rows + k]), torch.full((n,), weight, dtype=torch.float64), accumulate=True)
    return matrix.float()


def _correlate_axis(x: torch.Tensor, weights: tuple[float, ...], dim: int, mode: str) -> torch.Tensor:
    """1-D correlation along ``dim`` (-1 or -2) of the last two dims with a centred odd kernel."""
    matrix = _filter_matrix(x.shape[dim], tuple(float(w) for w in weights), mode).to(device=x.device, dtype=x.dtype)
    return x @ matrix.T if dim == -1 else matrix @ x


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two dims (what ``skimage.filters.gaussian`` calls with
    ``channel_axis``; its default mode is ``nearest``)."""
    if sigma <= 0:
        return x
    weights = _gaussian_weights(float(sigma), float(truncate))
    return _correlate_axis(_correlate_axis(x, weights, -2, mode), weights, -1, mode)


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "mirror") -> torch.Tensor:
    """``cv2.filter2D`` (correlation, anchor at the kernel centre, BORDER_REFLECT_101 = ``mirror``) over the last
    two dims. Kernels larger than 11×11 go through the FFT, as OpenCV's own implementation does."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[-2:]
    padded = pad2d(x, (ph, kh - 1 - ph), (pw, kw - 1 - pw), mode)
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    if kh * kw <= 121:
        flat = padded.reshape(-1, 1, *padded.shape[-2:])
        return F.conv2d(flat, kernel[None, None]).reshape(*x.shape)
    # Correlation = convolution with the flipped kernel; circular FFT convolution on the padded image is exact
    # on the valid region.
    size = padded.shape[-2:]
    spectrum = torch.fft.rfft2(padded) * torch.fft.rfft2(kernel.flip(0, 1), s=size)
    full = torch.fft.irfft2(spectrum, s=size)
    return full[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def _opencv_gaussian_1d(ksize: int, sigma: float) -> list[float]:
    # cv2.getGaussianKernel for sigma > 0.
    centre = (ksize - 1) / 2
    weights = [math.exp(-((i - centre) ** 2) / (2 * sigma * sigma)) for i in range(ksize)]
    total = sum(weights)
    return [w / total for w in weights]


def opencv_gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``cv2.GaussianBlur(x, (0, 0), sigmaX=sigma)`` on float images: kernel size ``round(8σ + 1) | 1``,
    BORDER_REFLECT_101."""
    ksize = int(round(sigma * 8 + 1)) | 1
    weights = tuple(_opencv_gaussian_1d(ksize, sigma))
    return _correlate_axis(_correlate_axis(x, weights, -2, "mirror"), weights, -1, "mirror")


@lru_cache(maxsize=32)
def _disk_kernel_cached(radius: float, alias_blur: float) -> tuple[tuple[float, ...], ...]:
    # ImageNet-C's disk(): an aliased disk on a grid of at least 17×17, normalised, then cv2.GaussianBlur
    # (3×3 up to radius 8, else 5×5; BORDER_REFLECT_101 on the kernel itself).
    if radius <= 8:
        span, ksize = range(-8, 9), 3
    else:
        span, ksize = range(-int(radius), int(radius) + 1), 5
    coords = list(span)
    disk = torch.tensor([[1.0 if x * x + y * y <= radius * radius else 0.0 for x in coords] for y in coords])
    disk = disk / disk.sum()
    g = tuple(_opencv_gaussian_1d(ksize, alias_blur))
    n = disk.shape[0]
    matrix = _filter_matrix(n, g, "mirror").double()
    blurred = matrix @ disk.double() @ matrix.T
    return tuple(tuple(row) for row in blurred.tolist())


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of ImageNet-C's ``disk(radius, alias_blur)``."""
    return torch.tensor(_disk_kernel_cached(float(radius), float(alias_blur)), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Colour (scikit-image / OpenCV conventions)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``skimage.color.rgb2hsv`` on ``[..., 3, H, W]`` in [0, 1]: H, S, V in [0, 1]; S = 0 where V = 0."""
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(-3)
    delta = v - rgb.min(-3).values
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = delta.clamp_min(1e-12)
    h = torch.where(r == v, (g - b) / safe, torch.where(g == v, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """``skimage.color.hsv2rgb`` (inverse of ``rgb_to_hsv``)."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = []
    for channel in range(3):
        value = torch.zeros_like(v)
        for sector, triple in enumerate(choices):
            value = torch.where(i == sector, triple[channel], value)
        out.append(value)
    return torch.stack(out, dim=-3)


def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """``cv2.cvtColor(x, COLOR_RGB2GRAY)`` for float images: 0.299 R + 0.587 G + 0.114 B, keeping the channel dim."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=rgb.device, dtype=rgb.dtype).view(3, 1, 1)
    return (rgb * weights).sum(-3, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """ImageNet-C's ``clipped_zoom``: crop the centre ``ceil(size / factor)``, enlarge it with
    ``scipy.ndimage.zoom(order=1)`` (bilinear, corner-aligned, output ``round(crop · factor)``), trim the centre."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    out_h, out_w = round(ch * factor), round(cw * factor)
    lead = crop.shape[:-2]
    flat = crop.reshape(-1, 1, ch, cw)
    zoomed = F.interpolate(flat, size=(out_h, out_w), mode="bilinear", align_corners=True)
    zoomed = zoomed.reshape(*lead, out_h, out_w)
    trim_top, trim_left = (out_h - h) // 2, (out_w - w) // 2
    return zoomed[..., trim_top : trim_top + h, trim_left : trim_left + w]


def imagemagick_motion_blur(x: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``MotionBlurImage`` (what ImageNet-C ran through Wand), one angle (degrees) per image.

    A one-sided line kernel of ``2·ceil(radius)+1`` taps with weights ``exp(-i²/2σ²)`` (normalised); tap ``i``
    reads the pixel at ``(x + round(i cos θ), y + round(i sin θ))`` with ImageMagick's rounding
    ``ceil(v - 0.5)``, edge pixels repeated outside the image.
    """
    width = 2 * math.ceil(radius) + 1
    weights = [math.exp(-(i * i) / (2.0 * sigma * sigma)) for i in range(width)]
    total = sum(weights)
    weights = [w / total for w in weights]
    h, w = x.shape[-2:]
    radians = angles.double().cpu() * (math.pi / 180.0)
    taps = torch.arange(width, dtype=torch.float64)
    dx = torch.ceil(taps[None, :] * torch.cos(radians)[:, None] - 0.5).long()  # [B, width]
    dy = torch.ceil(taps[None, :] * torch.sin(radians)[:, None] - 0.5).long()
    pad = width  # every offset lies within [-width, width]
    padded = pad2d(x, (pad, pad), (pad, pad), "nearest")
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for i, weight in enumerate(weights):
            oy, ox = pad + int(dy[b, i]), pad + int(dx[b, i])
            out[b].add_(padded[b, ..., oy : oy + h, ox : ox + w], alpha=weight)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Resampling (PIL conventions)


@lru_cache(maxsize=64)
def _pil_box_taps(in_size: int, out_size: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    # PIL's ImagingResample precompute_coeffs with the BOX filter (support 0.5), in float64.
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    indices, weights = [], []
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), in_size)
        ks = []
        for xi in range(xmin, xmax):
            t = (xi - centre + 0.5) / filterscale
            ks.append(1.0 if -0.5 <= t < 0.5 else 0.0)
        total = sum(ks)
        indices.append(tuple(range(xmin, xmax)))
        weights.append(tuple(k / total for k in ks) if total else tuple(ks))
    return tuple(indices), tuple(weights)


def box_resize_matrix(in_size: int, out_size: int, device) -> torch.Tensor:
    """PIL ``Image.resize(..., BOX)`` along one axis as an ``out × in`` matrix."""
    return _box_matrix(in_size, out_size).to(device)


@lru_cache(maxsize=64)
def _box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    indices, weights = _pil_box_taps(in_size, out_size)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for row, (ix, wx) in enumerate(zip(indices, weights)):
        for i, weight in zip(ix, wx):
            matrix[row, i] = weight
    return matrix.float()


# ---------------------------------------------------------------------------------------------------------------
# Textures


def plasma_fractal(batch: int, mapsize: int, wibbledecay: float, draws: Draws) -> torch.Tensor:
    """ImageNet-C's diamond-square height map, ``[batch, mapsize, mapsize]`` in [0, 1], one per image."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    m = torch.zeros(batch, mapsize, mapsize, device=draws.device)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(array: torch.Tensor) -> torch.Tensor:
        return array / 4 + draws.uniform(array.shape, -wibble * wibble, wibble * wibble)

    while step >= 2:
        half = step // 2
        corners = m[:, 0:mapsize:step, 0:mapsize:step]
        squares = corners + torch.roll(corners, -1, dims=1)
        squares = squares + torch.roll(squares, -1, dims=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(squares)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + torch.roll(dr, 1, dims=1) + ul + torch.roll(ul, -1, dims=2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + torch.roll(dr, 1, dims=2) + ul + torch.roll(ul, -1, dims=1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)
