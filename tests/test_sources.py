"""Image sources: the eval protocol, label mapping, ImageNet-C layout, errors, and the Imagenette cache (offline:
downloads come from ``file://`` URLs of archives built here)."""

import io
import os
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imse.core import resources
from imse.data import sources
from imse.data.sources import (
    IMAGENETTE_URL,
    ImageFolderSource,
    ImageNetCSource,
    Source,
    imagenet_class_names,
    imagenet_wnids,
    imagenette_source,
    prepare_image,
)

WNIDS = ["n01440764", "n01443537", "n02102040"]  # tench (0), goldfish (1), English springer (217)


def save(path: Path, size=(40, 30), mode="RGB", value=0, seed=None) -> Path:
    """Write a small image: a solid ``value`` or, with ``seed``, random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        image = Image.new(mode, size, value)
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if bands == 1 else pixels, mode)
    image.save(path)
    return path


def bordered(width: int, height: int, border: int) -> Image.Image:
    """Red frame of ``border`` px around a green interior."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[border : height - border, border : width - border] = (0, 255, 0)
    return Image.fromarray(pixels)


def test_imagenet_class_list_is_offline_and_in_index_order():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(set(wnids)) == len(names) == 1000
    assert wnids[0] == "n01440764" and wnids[1] == "n01443537" and wnids[-1] == "n15075141"
    assert names[0].startswith("tench") and names[1].startswith("goldfish")
    assert wnids.index("n02102040") == 217
    wnids.append("x")  # callers get copies: the cached list cannot be changed through them
    assert len(imagenet_wnids()) == 1000


def test_folder_source_shapes_order_labels_and_modes(tmp_path):
    root = tmp_path / "data"
    # "cat" and "dog" are not wnids: labels are sorted folder positions. Mixed sizes, modes and extensions.
    save(root / "dog" / "b.PNG", (50, 20), "L", value=200)
    save(root / "dog" / "a.jpg", (30, 60), "RGB", value=(10, 200, 30))
    save(root / "cat" / "z.png", (64, 64), "RGBA", value=(250, 5, 5, 0))
    save(root / "cat" / "nested" / "y.bmp", (33, 33), "RGB", value=(1, 2, 3))
    (root / "cat" / "notes.txt").write_text("not an image")
    save(root / "cat" / ".hidden.png", (8, 8))
    (root / ".cache").mkdir()

    source = ImageFolderSource(root, size=16)
    assert isinstance(source, Source)
    assert source.classes == ["cat", "dog"] and source.class_names == ["cat", "dog"]
    assert source.num_classes == 2 and not source.uses_imagenet_labels and source.name == "data"
    assert len(source) == 4
    assert [path.relative_to(root).as_posix() for path, _ in source.samples] == [
        "cat/nested/y.bmp",
        "cat/z.png",
        "dog/a.jpg",
        "dog/b.PNG",
    ]
    images, labels = source.load([3, 0, 1, 2])
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 0, 0, 1]
    assert (images[0] == 200).all()  # grayscale -> three equal channels
    assert images[1].flatten(1).float().mean(1).tolist() == [1.0, 2.0, 3.0]
    assert images[2].flatten(1).float().mean(1).tolist() == [250.0, 5.0, 5.0]  # RGBA: alpha dropped
    assert (images[3].flatten(1).float().mean(1) - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 3  # JPEG

    again, again_labels = source.load([3, 0, 1, 2])
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    single, single_label = source.load([2])
    assert torch.equal(single[0], images[3]) and single_label.tolist() == [1]
    empty, empty_labels = source.load([])
    assert empty.shape == (0, 3, 16, 16) and empty_labels.shape == (0,)
    with pytest.raises(IndexError, match="out of range"):
        source.load([4])


def test_wnid_folders_get_imagenet_labels(tmp_path):
    for number, wnid in enumerate(reversed(WNIDS)):
        save(tmp_path / wnid / f"{number}.JPEG", (20, 20), value=(number, 0, 0))
    source = ImageFolderSource(tmp_path, size=8)
    assert source.uses_imagenet_labels and source.num_classes == 1000
    assert source.class_names == imagenet_class_names()
    assert source.labels.tolist() == [0, 1, 217]
    _, labels = source.load([2, 1, 0])
    assert labels.tolist() == [217, 1, 0]


def test_mixed_wnid_and_other_folders_fall_back_to_sorted_positions(tmp_path):
    save(tmp_path / "n01440764" / "a.png", (10, 10))
    save(tmp_path / "alpha" / "a.png", (10, 10))
    source = ImageFolderSource(tmp_path, size=8)
    assert source.num_classes == 2 and source.class_names == ["alpha", "n01440764"]
    assert source.labels.tolist() == [0, 1]


@pytest.mark.parametrize(("width", "height"), [(320, 240), (240, 320), (300, 300)])
def test_eval_protocol_crops_the_border_away(tmp_path, width, height):
    """Resizing the shorter side to 256 and cropping 224 keeps the central 87.5 %: a frame of 5 % of the
    shorter side on each edge must disappear, and the interior must fill the whole crop."""
    border = round(0.05 * min(width, height))
    path = tmp_path / "frame" / "x.png"
    path.parent.mkdir()
    bordered(width, height, border).save(path)
    images, _ = ImageFolderSource(tmp_path, size=224).load([0])
    assert images.shape == (1, 3, 224, 224)
    assert (images[0, 0] == 0).all() and (images[0, 1] == 255).all() and (images[0, 2] == 0).all()
    # A frame thicker than the margin cropped off the shorter side (6.25 %) must still show there, and only on
    # the edges: a 9 % frame leaves 0.09 · 256 - 16 ≈ 7 px. The longer side loses more, so its frame is gone.
    thick = round(0.09 * min(width, height))
    bordered(width, height, thick).save(path)
    images, _ = ImageFolderSource(tmp_path, size=224).load([0])
    red = images[0, 0] > 128
    red_rows = bool(red[:6].all() and red[-6:].all())
    red_columns = bool(red[:, :6].all() and red[:, -6:].all())
    assert red_rows == (height <= width) and red_columns == (width <= height)
    assert not red[9:-9, 9:-9].any()


def test_prepare_image_equals_torchvision_eval_transform():
    """Same rounding as timm/torchvision's Resize(256) + CenterCrop(224) on PIL images, pixel for pixel."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for width, height, size in [(333, 250, 224), (250, 333, 224), (97, 131, 32), (64, 64, 56)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        reference = transforms.Compose(
            [
                transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(size),
                transforms.PILToTensor(),
            ]
        )(image)
        assert torch.equal(prepare_image(image, size), reference)


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(missing)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolderSource(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no class folders in .*empty"):
        ImageFolderSource(empty)
    (empty / "cls").mkdir()
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images in .*empty"):
        ImageFolderSource(empty)
    with pytest.raises(ValueError, match="size"):
        ImageFolderSource(empty, size=0)


def test_corrupt_file_raises_value_error_naming_it(tmp_path):
    save(tmp_path / "a" / "good.png", (12, 12), value=(9, 9, 9))
    (tmp_path / "a" / "junk.jpg").write_bytes(b"definitely not a jpeg")
    truncated = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated, "JPEG")
    (tmp_path / "a" / "short.jpg").write_bytes(truncated.getvalue()[:300])
    source = ImageFolderSource(tmp_path, size=8)
    names = [path.name for path, _ in source.samples]
    assert names == ["good.png", "junk.jpg", "short.jpg"]
    images, _ = source.load([0])
    assert (images == 9).all()
    with pytest.raises(ValueError, match="junk.jpg"):
        source.load([0, 1])
    with pytest.raises(ValueError, match="short.jpg"):
        source.load([2])


def make_imagenet_c(root: Path) -> None:
    for corruption, severities in {"fog": (1, 5), "gaussian_noise": (3,)}.items():
        for severity in severities:
            for number, wnid in enumerate(WNIDS):
                save(
                    root / corruption / str(severity) / wnid / f"ILSVRC2012_val_{number:08d}.JPEG",
                    (224, 224),
                    seed=number,
                )


def test_imagenet_c_layout_labels_and_no_second_crop(tmp_path):
    make_imagenet_c(tmp_path)
    source = ImageNetCSource(tmp_path, "fog", 5)
    assert source.name == "imagenet-c/fog/5" and source.corruption == "fog" and source.severity == 5
    assert len(source) == 3 and source.num_classes == 1000 and source.class_names[0].startswith("tench")
    images, labels = source.load([0, 1, 2])
    assert images.shape == (3, 3, 224, 224) and labels.tolist() == [0, 1, 217]
    # 224 px images at size 224 are decoded as they are: no 256/224 zoom.
    for row, (path, _) in enumerate(source.samples):
        with Image.open(path) as image:
            assert torch.equal(images[row], torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    # Another size: shorter side straight to that size (the whole image stays visible).
    small, _ = ImageNetCSource(tmp_path, "fog", 5, size=112).load([0])
    with Image.open(source.samples[0][0]) as image:
        expected = np.asarray(image.convert("RGB").resize((112, 112), Image.Resampling.BILINEAR))
    assert torch.equal(small[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_imagenet_c_errors(tmp_path):
    make_imagenet_c(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no ImageNet-C folder .*snow.5.*fog, gaussian_noise"):
        ImageNetCSource(tmp_path, "snow", 5)
    with pytest.raises(FileNotFoundError, match=r"no ImageNet-C folder .*fog.3"):
        ImageNetCSource(tmp_path, "fog", 3)
    with pytest.raises(FileNotFoundError, match="no ImageNet-C root"):
        ImageNetCSource(tmp_path / "missing", "fog", 5)
    for severity in (0, 6, "5", True):
        with pytest.raises(ValueError, match="severity"):
            ImageNetCSource(tmp_path, "fog", severity)
    with pytest.raises(ValueError, match="corruption"):
        ImageNetCSource(tmp_path, "../fog", 5)
    save(tmp_path / "odd" / "1" / "cats" / "a.png", (10, 10))
    with pytest.raises(ValueError, match="cats"):
        ImageNetCSource(tmp_path, "odd", 1)
    (tmp_path / "blank" / "2").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no class folders in .*blank.2"):
        ImageNetCSource(tmp_path, "blank", 2)


# --- Imagenette -----------------------------------------------------------------------------------------------


def tarball(path: Path, members: dict[str, bytes]) -> str:
    """A .tgz of the given files, returned as a file:// URL."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.as_uri()


def jpeg_bytes(value) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 32), value).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("IMSE_OFFLINE", raising=False)


def count_urlopen(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = urllib.request.urlopen

    def spy(url, *args, **kwargs):
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(sources.urllib.request, "urlopen", spy)
    return calls


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "IMSE_OFFLINE"])
def test_imagenette_offline_fails_fast_with_instructions(tmp_path, monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    calls = count_urlopen(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as caught:
        imagenette_source(cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 1 and calls == []
    message = str(caught.value)
    assert "could not be downloaded" in message and IMAGENETTE_URL in message
    assert str(tmp_path / "cache" / "imagenette2-320" / "val") in message and "--data <folder>" in message
    assert not (tmp_path / "cache").exists()


def test_imagenette_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMSE_CACHE", str(tmp_path / "from-env"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resources.default_cache_dir() == tmp_path / "from-env"
    with pytest.raises(RuntimeError, match="from-env"):
        imagenette_source()
    monkeypatch.delenv("IMSE_CACHE")
    assert resources.default_cache_dir() == Path.home() / ".cache" / "imse"


def test_imagenette_download_populates_cache_once(tmp_path, monkeypatch, online):
    url = tarball(
        tmp_path / "imagenette2-320.tgz",
        {
            "imagenette2-320/val/n01440764/a.JPEG": jpeg_bytes((200, 0, 0)),
            "imagenette2-320/val/n02102040/b.JPEG": jpeg_bytes((0, 200, 0)),
            "imagenette2-320/train/n01440764/c.JPEG": jpeg_bytes((0, 0, 200)),
            "imagenette2-320/noisy_imagenette.csv": b"path,noisy_labels_0\n",
        },
    )
    cache = tmp_path / "cache"
    calls = count_urlopen(monkeypatch)
    source = imagenette_source(size=32, cache_dir=cache, url=url)
    assert calls == [url]
    assert source.name == "imagenette" and len(source) == 2 and source.num_classes == 1000
    images, labels = source.load([0, 1])
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 217]
    assert images[0, 0].float().mean() > 190 and images[1, 1].float().mean() > 190
    assert sorted(os.listdir(cache)) == ["imagenette2-320"]  # no temporary file or folder left
    assert (cache / "imagenette2-320" / "train" / "n01440764" / "c.JPEG").is_file()

    again = imagenette_source(size=32, cache_dir=cache, url=url)
    assert calls == [url]  # served from the cache
    assert torch.equal(again.load([0, 1])[0], images)
    # With the cache filled, offline mode is no obstacle.
    monkeypatch.setenv("IMSE_OFFLINE", "1")
    assert len(imagenette_source(size=32, cache_dir=cache, url=url)) == 2


def test_imagenette_refuses_unsafe_archive_and_leaves_nothing(tmp_path, online):
    cache = tmp_path / "cache"
    url = tarball(
        tmp_path / "evil.tgz",
        {"imagenette2-320/val/n01440764/a.JPEG": jpeg_bytes(1), "../evil": b"gotcha"},
    )
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*unsafe path '\.\./evil'"):
        imagenette_source(cache_dir=cache, url=url)
    assert not (tmp_path / "evil").exists() and not (cache.parent / "evil").exists()
    assert os.listdir(cache) == []

    absolute = tarball(tmp_path / "absolute.tgz", {"/tmp/imse-evil": b"x"})
    with pytest.raises(RuntimeError, match="unsafe path"):
        imagenette_source(cache_dir=cache, url=absolute)
    assert os.listdir(cache) == [] and not Path("/tmp/imse-evil").exists()

    link_archive = tmp_path / "link.tgz"
    with tarfile.open(link_archive, "w:gz") as tar:
        info = tarfile.TarInfo("imagenette2-320/val/n01440764/link.JPEG")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(RuntimeError, match="link"):
        imagenette_source(cache_dir=cache, url=link_archive.as_uri())
    assert os.listdir(cache) == []


def test_imagenette_failed_or_wrong_download_leaves_no_cache(tmp_path, online):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"could not be downloaded.*--data <folder>"):
        imagenette_source(cache_dir=cache, url=(tmp_path / "absent.tgz").as_uri())
    assert os.listdir(cache) == []
    (tmp_path / "broken.tgz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(RuntimeError, match="refusing the archive"):
        imagenette_source(cache_dir=cache, url=(tmp_path / "broken.tgz").as_uri())
    assert os.listdir(cache) == []
    other = tarball(tmp_path / "other.tgz", {"something/else.JPEG": jpeg_bytes(3)})
    with pytest.raises(RuntimeError, match="no imagenette2-320/val"):
        imagenette_source(cache_dir=cache, url=other)
    assert os.listdir(cache) == []
    # A cache folder without val is the user's: reported, never overwritten.
    (cache / "imagenette2-320" / "train").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="has no val folder"):
        imagenette_source(cache_dir=cache, url=other)
    assert os.listdir(cache / "imagenette2-320") == ["train"]
