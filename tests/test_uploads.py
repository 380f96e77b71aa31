"""A user's own images: the layouts said back, classes matched loosely, every classic attack on an upload refused
with a sentence (nothing written outside the session's folder), unreadable images skipped and counted, and the same
upload never decoded twice. Zips are built here from the shipped Fashion-MNIST test images."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from imse.data.fashion_mnist import CLASS_NAMES, load_shipped, to_rgb32
from imse.data.models import model_view
from imse.data.streams import Stream, own_domains
from imse.data.upload_files import UploadLimits, UploadRefused
from imse.data.uploads import UNLABELLED, prepare_upload

BUILTIN_VIEW = model_view("builtin")
FOLDER = {i: name.replace("/", "_") for i, name in enumerate(CLASS_NAMES)}  # "T-shirt_top": a folder can't hold "/"


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_shipped("test")
    return images[:60], labels[:60].astype(int)


def write_zip(path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def layout_members(kind: str, images, labels) -> tuple[dict[str, bytes], list[str], list[int | None]]:
    """The members of a zip in one layout, and each image's expected domain and label, in the order the upload is
    read (sorted paths)."""
    members, expected = {}, []
    for i, (image, label) in enumerate(zip(images, labels)):
        domain = ("day", "dusk", "night")[i % 3]
        path = {
            "images": f"photos/{i:03d}.png",
            "CLASS/images": f"{FOLDER[label]}/{i:03d}.png",
            "DOMAIN/images": f"{domain}/{i:03d}.png",
            "DOMAIN/CLASS/images": f"{domain}/{FOLDER[label]}/{i:03d}.png",
        }[kind]
        members[path] = png(image)
        labelled = kind.endswith("CLASS/images")
        expected.append((path, domain if kind.startswith("DOMAIN") else None, label if labelled else None, i))
    return members, expected


SAID = {
    "images": "60 images in one domain, no labels",
    "CLASS/images": "60 images in one domain, 10 classes matched to the model's",
    "DOMAIN/images": "60 images in 3 domains (day, dusk, night), no labels",
    "DOMAIN/CLASS/images": "60 images in 3 domains (day, dusk, night), 10 classes matched to the model's",
}


@pytest.mark.parametrize("kind", list(SAID))
def test_each_layout_is_detected_said_back_and_read_as_the_model_sees_it(kind, fashion, tmp_path):
    images, labels = fashion
    members, expected = layout_members(kind, images, labels)
    upload = prepare_upload([write_zip(tmp_path / "up.zip", members)], BUILTIN_VIEW, tmp_path / "session")
    assert upload.summary() == SAID[kind]
    assert upload.manifest["kind"] == kind
    assert upload.domains == (["day", "dusk", "night"] if kind.startswith("DOMAIN") else
                              ["photos" if kind == "images" else "your images"])  # fmt: skip
    expected.sort(key=lambda entry: entry[0])  # the upload's order: its paths, sorted
    for domain in upload.domains:
        source = upload.source(domain)
        mine = [e for e in expected if e[1] in (domain, None)]
        got_images, got_labels = source.load(range(len(source)))
        originals = torch.as_tensor(np.stack([images[e[3]] for e in mine]))
        # the built-in model's own rule for its 28-px images: centred on 32 px of black, grey to RGB
        assert torch.equal(got_images, to_rgb32(originals))
        assert got_labels.tolist() == [UNLABELLED if e[2] is None else e[2] for e in mine]


def test_class_folders_match_ignoring_case_spaces_and_underscores_and_imagenet_ids(tmp_path):
    builtin = BUILTIN_VIEW.classes
    assert [builtin.index(name) for name in ("ankle boot", "ANKLE_BOOT", "Ankle  Boot", "t-shirt_top", "top")] == [
        9,
        9,
        9,
        0,
        0,
    ]
    assert builtin.index("boots") is None and builtin.closest("Sneakerz")[0] == "Sneaker"
    imagenet = model_view("deit_tiny_patch16_224.fb_in1k").classes
    assert [imagenet.index(name) for name in ("n01440764", "Tinca_tinca", "tench", "great white shark")] == [0, 0, 0, 2]
    with pytest.raises(UploadRefused, match=r"'crane' names several classes .*\(class 134\).*\(class 517\).*WordNet"):
        imagenet.index("crane")


def test_folders_that_match_no_class_are_refused_with_the_closest_names_or_run_unlabelled(fashion, tmp_path):
    images, labels = fashion
    members = {f"{'Sneakerz' if label == 7 else FOLDER[label]}/{i}.png": png(image)
               for i, (image, label) in enumerate(zip(images, labels))}  # fmt: skip
    path = write_zip(tmp_path / "up.zip", members)
    with pytest.raises(UploadRefused, match=r"^class folders that match none of the model's classes: 'Sneakerz' "
                       r"\(closest: Sneaker\)\. Rename them, or run the upload unlabelled$"):  # fmt: skip
        prepare_upload([path], BUILTIN_VIEW, tmp_path / "session")
    unlabelled = prepare_upload([path], BUILTIN_VIEW, tmp_path / "session", labelled=False)
    assert unlabelled.summary() == "60 images in one domain, no labels" and not unlabelled.labelled
    # under domains, the same rule for their class folders
    nested = write_zip(tmp_path / "nested.zip", {f"day/{name}": data for name, data in members.items()})
    with pytest.raises(UploadRefused, match="'Sneakerz' \\(closest: Sneaker\\)"):
        prepare_upload([nested], BUILTIN_VIEW, tmp_path / "session")


def test_unreadable_images_are_skipped_and_counted_and_the_same_upload_is_not_decoded_again(
    fashion, tmp_path, monkeypatch
):
    import imse.data.uploads as uploads

    images, labels = fashion
    members = {f"{FOLDER[label]}/{i}.png": png(image) for i, (image, label) in enumerate(zip(images[:8], labels))}
    jpeg = io.BytesIO()
    Image.fromarray(images[0]).save(jpeg, "JPEG")
    members |= {"Bag/broken.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "Bag/notes.txt": b"hello"}
    path = write_zip(tmp_path / "up.zip", members)
    decoded = []
    monkeypatch.setattr(uploads, "_decode", lambda *a, real=uploads._decode: decoded.append(a[0]) or real(*a))
    first = prepare_upload([path], BUILTIN_VIEW, tmp_path / "session")
    assert first.summary() == (
        f"8 images in one domain, {len(set(labels[:8]))} classes matched to the model's, 2 files skipped: "
        "notes.txt (not an image), broken.jpg (truncated)"
    )
    assert len(decoded) == 9  # the 8 and the broken one; notes.txt is never opened
    again = prepare_upload([path], BUILTIN_VIEW, tmp_path / "session")
    assert again.folder == first.folder and len(decoded) == 9  # found, not decoded again
    unlabelled = prepare_upload([path], BUILTIN_VIEW, tmp_path / "session", labelled=False)
    assert unlabelled.folder != first.folder and len(decoded) == 18  # another preparation: its own folder


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1×1 PNG whose header claims ``width`` × ``height`` pixels (its IHDR's CRC fixed up)."""
    data = bytearray(png(np.zeros((1, 1), dtype=np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _written(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _symlink_zip(path) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        link = zipfile.ZipInfo("Bag/evil.png")
        link.external_attr = 0o120777 << 16  # a symbolic link, as zip -y stores one
        archive.writestr(link, "/etc/passwd")
    return str(path)


def _encrypted_zip(path, image: bytes) -> str:
    """A zip whose member is flagged encrypted (bit 0 of its flags, in its local and central headers): what a
    reader sees of an encrypted zip (the standard library writes none)."""
    data = bytearray(_zip_bytes({"Bag/0.png": image}))
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature) + flags
        data[at] |= 0x1
    path.write_bytes(bytes(data))
    return str(path)


def _bomb_zip(path) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Bag/bomb.png", b"\0" * (64 << 20))  # 64 MB of zeros in ~64 KB
    return str(path)


ATTACKS = {
    "over the size limit": (lambda p, im: write_zip(p, {"Bag/0.png": im}), {"max_bytes": 100},
                            r"^the upload is 0\.0 MB; this server takes at most 0 MB$"),
    "more images than allowed": (lambda p, im: write_zip(p, {f"Bag/{i}.png": im for i in range(5)}),
                                 {"max_images": 4}, r"^the upload holds 5 images; this server takes at most 4$"),
    "a bomb": (lambda p, im: _bomb_zip(p), {}, r"^Bag/bomb\.png unpacks to more than 100× its compressed size: "
               r"refused as a zip bomb$"),
    "a content bomb": (lambda p, im: write_zip(p, {f"Bag/{i}.png": im for i in range(3)}),
                       {"max_content_bytes": len(png(np.zeros((28, 28), np.uint8))) * 2},
                       r"^the upload unpacks to more than 0 MB: refused as a zip bomb$"),
    "a path that climbs": (lambda p, im: write_zip(p, {"Bag/../../escaped.png": im}), {},
                           r"^the upload holds a path that climbs out of it \('Bag/\.\./\.\./escaped\.png'\): "
                           r"refused$"),
    "an absolute path": (lambda p, im: write_zip(p, {"/tmp/absolute.png": im}), {},
                         r"^the upload holds an absolute path \('/tmp/absolute\.png'\): refused$"),
    "a symbolic link": (lambda p, im: _symlink_zip(p), {},
                        r"^the upload holds a symbolic link \(Bag/evil\.png\): refused$"),
    "a nested archive": (lambda p, im: write_zip(p, {"Bag/0.png": im, "Bag/more.zip": b"PK\x03\x04"}), {},
                         r"^the upload holds an archive inside it \(Bag/more\.zip\): nested archives are refused$"),
    "an archive named .png": (lambda p, im: write_zip(p, {"Bag/0.png": _zip_bytes({"a.png": im})}), {},
                              r"^Bag/0\.png is an archive, not an image: nested archives are refused$"),
    "an encrypted zip": (lambda p, im: _encrypted_zip(p, im), {},
                         r"^the upload is encrypted \(Bag/0\.png\): upload an unencrypted zip$"),
    "a header claiming too many pixels": (lambda p, im: write_zip(p, {"Bag/big.png": _png_claiming(50_000, 50_000)}),
                                          {}, r"^Bag/big\.png claims 2,500,000,000 pixels; the limit is 40,000,000 "
                                          r"per image: refused before decoding$"),
    "a header claiming a little too many": (lambda p, im: write_zip(p, {"Bag/big.png": _png_claiming(7000, 7000)}),
                                            {}, r"^Bag/big\.png claims 49,000,000 pixels; the limit is 40,000,000 per "
                                            r"image: refused before decoding$"),
    "an empty zip": (lambda p, im: write_zip(p, {}), {},
                     r"^the upload holds no images \(PNG, JPEG, WebP, BMP or GIF\)$"),
    "no images, only other files": (lambda p, im: write_zip(p, {"notes.txt": b"hi"}), {},
                                    r"^the upload holds no images \(PNG, JPEG, WebP, BMP or GIF\); it holds 1 other "
                                    r"file\(s\)$"),
    "an empty file": (lambda p, im: _written(p, b""), {},
                      r"^the upload is empty: choose a \.zip or image files$"),
    "not a zip named .zip": (lambda p, im: _written(p, b"hello, world"), {},
                             r"^up\.zip is named \.zip but is not a zip archive$"),
    "a mixed layout": (lambda p, im: write_zip(p, {"0.png": im, "Bag/1.png": im}), {},
                       r"^mixed layout \(1 at depth 1, 1 at depth 2\): lay the upload out as images; CLASS/images; "
                       r"DOMAIN/images; or DOMAIN/CLASS/images$"),
    "class folders that match nothing": (lambda p, im: write_zip(p, {"Bag/0.png": im, "Bagz/1.png": im}), {},
                                         r"^class folders that match none of the model's classes: 'Bagz' \(closest: "
                                         r"Bag\)\. Rename them, or run the upload unlabelled$"),
}  # fmt: skip


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_classic_attack_is_refused_with_a_sentence_and_nothing_is_written(attack, tmp_path):
    make, limits, sentence = ATTACKS[attack]
    image = png(np.full((28, 28), 128, dtype=np.uint8))
    upload = make(tmp_path / "up.zip", image)
    session = tmp_path / "session"
    with pytest.raises(UploadRefused, match=sentence):
        prepare_upload([upload], BUILTIN_VIEW, session, limits=UploadLimits(**limits))
    assert not session.exists() or not any(session.iterdir())  # no half-prepared folder left behind
    assert {p.name for p in tmp_path.iterdir()} <= {"up.zip", "session"}  # nothing written beside it
    assert not (tmp_path.parent / "escaped.png").exists()


def test_an_archive_other_than_a_zip_is_refused_as_one_not_as_a_nested_archive(tmp_path):
    import tarfile

    image = png(np.full((28, 28), 128, dtype=np.uint8))
    with tarfile.open(tmp_path / "photos.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("Bag/0.png")
        info.size = len(image)
        archive.addfile(info, io.BytesIO(image))
    with pytest.raises(UploadRefused, match=r"^photos\.tar\.gz is not a \.zip: upload a \.zip archive, or the image "):
        prepare_upload([tmp_path / "photos.tar.gz"], BUILTIN_VIEW, tmp_path / "session", limits=UploadLimits())
    assert not (tmp_path / "session").exists() or not any((tmp_path / "session").iterdir())


def test_a_lying_header_never_unpacks_more_than_it_declares(fashion, tmp_path):
    """A member whose header understates its size is read only to the size declared (then fails its CRC): skipped
    as damaged, its decompressed bytes bounded by what the header said."""
    images, _ = fashion
    path = tmp_path / "up.zip"
    members = {f"Bag/{i}.png": png(images[i]) for i in range(2)}
    write_zip(path, {**members, "Bag/liar.png": png(images[3]) + b"\0" * (1 << 20)})
    data = bytearray(path.read_bytes())
    # the central directory's entry for the liar (what readers trust): its uncompressed size, 24 bytes in
    entry = next(
        i for i in range(len(data)) if data[i : i + 4] == b"PK\x01\x02" and data[i + 46 : i + 58] == b"Bag/liar.png"
    )
    assert struct.unpack("<I", data[entry + 24 : entry + 28])[0] > 1 << 20
    data[entry + 24 : entry + 28] = struct.pack("<I", 100)
    path.write_bytes(bytes(data))
    upload = prepare_upload([str(path)], BUILTIN_VIEW, tmp_path / "session")
    assert upload.manifest["skipped"] == [["Bag/liar.png", "damaged in the zip"]] and len(upload) == 2


def test_own_domains_stream_in_name_order_each_at_most_its_images(fashion, tmp_path):
    images, labels = fashion
    members = {f"{domain}/{i}.png": png(images[i]) for i, domain in enumerate(["b"] * 5 + ["a"] * 20 + ["c"] * 9)}
    upload = prepare_upload([write_zip(tmp_path / "up.zip", members)], BUILTIN_VIEW, tmp_path / "session")
    assert upload.domains == ["a", "b", "c"] and upload.domain_sizes() == [20, 5, 9]
    domains = own_domains(upload.domains, "recurring", rounds=2)
    stream = Stream(None, "recurring", per_domain=8, batch_size=4, pregenerated=lambda d: upload.source(d.corruption),
                    domains=domains)  # fmt: skip
    batches = list(stream)
    assert len(stream) == len(batches) == 2 * (2 + 2 + 2)  # 8, 5 and 8 images, in batches of 4
    assert [b.domain.name for b in batches if b.first_of_domain] == ["a", "b", "c", "a", "b", "c"]
    assert sum(len(b.labels) for b in batches) == 2 * (8 + 5 + 8)
    assert all((b.labels == UNLABELLED).all() for b in batches)
    with pytest.raises(ValueError, match="gradual scenario steps through corruption severities"):
        own_domains(upload.domains, "gradual")
