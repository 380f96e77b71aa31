"""Faults, each one actually caused: a writer killed (SIGKILL) while it saves a domain bank, a spectral code or an
SVD cache entry; cache entries damaged on disk; missing, unreadable or wrong dataset, weights, bank and code files.

What must hold: a killed save leaves the previous file or the new one, complete (never part of one), and its
temporary file is neither read as the real file nor in the way of the next save; a damaged cache entry is
rebuilt (bit-exact to a fresh SVD), never trusted; a bad input fails with an ordinary exception that names it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from safetensors import safe_open
from torch import nn

from imse.core.bank import BankMismatchError, Descriptor, DomainBank
from imse.core.codes import load_code, save_code
from imse.core.methods import create
from imse.core.spectral import CodeMismatchError, SpectralLinear, get_code, inject, set_code
from imse.core.svd_cache import SVDCache, decompose
from imse.data.fashion_mnist import load_idx_split
from imse.data.models import BackboneUnavailable, create_backbone
from imse.data.sources import ImageFolderSource, ImageNetCSource

REPO = Path(__file__).resolve().parents[1]
HUB_NAME = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"

# --- A writer killed mid-save ---------------------------------------------------------------------------------

# Each version is tens of MB, so that a save takes long enough for a kill to land inside it.
BANK_PAYLOAD = 2_000_000  # floats per optimizer tensor; 2 slots x 2 tensors: 32 MB a bank
CODE_LAYERS, CODE_RANK = 4, 2_000_000  # a 32 MB spectral code
SVD_SHAPE, SVD_SEED = (65_536, 64), 7  # U alone is 16 MB

# The child imports torch and imse once (seconds; timm would add more), then forks one writer per request read
# from stdin, so that every writer is a process of its own, killed with SIGKILL, at no import cost. A writer saves
# version 0, 1, 2, ... to the same path as fast as it can and prints "saved <v>" after each save has returned.
# (OMP_NUM_THREADS=1 and no torch work before the fork: forking is safe.)
CHILD = r"""
import json, os, sys, traceback
import torch
from torch import nn
from imse.core import svd_cache
from imse.core.bank import Descriptor, DomainBank
from imse.core.codes import save_code
from imse.core.spectral import SpectralLinear


def bank_writer(path, arg):
    def write(v):
        bank = DomainBank(capacity=4)
        for _ in range(2):
            optimizer = {
                "state": {0: {"step": torch.tensor(float(v)), "exp_avg": torch.full((arg["payload"],), float(v)),
                              "exp_avg_sq": torch.full((arg["payload"],), float(v))}},
                "param_groups": [{"lr": 7e-3, "params": [0]}],
            }
            code = {name: torch.full((rank,), float(v)) for name, rank in arg["identity"]["code_layout"].items()}
            bank.store(Descriptor(torch.full((64,), float(v)), torch.ones(64)), code, optimizer, label=f"v{v}")
        bank.save(path, arg["identity"])
    return write


def code_writer(path, arg):
    rank = arg["rank"]
    model = nn.Sequential(*(SpectralLinear(torch.ones(1, rank), torch.ones(rank), torch.ones(rank, 1))
                            for _ in range(arg["layers"])))

    def write(v):
        with torch.no_grad():
            for layer in model:
                layer.S.fill_(float(v))
        save_code(path, model, extra={"version": str(v)})
    return write


def svd_writer(path, arg):
    weight = torch.randn(*arg["shape"], generator=torch.Generator().manual_seed(arg["seed"]))
    cache = svd_cache.SVDCache(path)
    factors = cache.decompose(weight)
    assert cache.hits == 1, "the parent writes the entry first"
    # Every call now misses and rewrites the same entry, through the cache's own write path; the factors are
    # the ones just read (a fresh SVD would only slow the loop down: what is under test is the write).
    svd_cache.decompose = lambda _: factors
    cache._load = lambda _: None
    return lambda v: cache.decompose(weight)


def run(kind, path, arg):
    write = {"bank": bank_writer, "code": code_writer, "svd": svd_writer}[kind](path, arg)
    v = 0
    while True:
        write(v)
        sys.stdout.write(f"saved {v}\n")
        sys.stdout.flush()
        v += 1


print("loaded", flush=True)
for command in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            run(*json.loads(command))
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    print(f"forked {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"reaped {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)
"""


def big_code_model() -> nn.Module:
    """The model the "code" child saves, with its source values (S0) and layer names."""
    ones = torch.ones
    return nn.Sequential(
        *(SpectralLinear(ones(1, CODE_RANK), ones(CODE_RANK), ones(CODE_RANK, 1)) for _ in range(CODE_LAYERS))
    )


def svd_weight() -> torch.Tensor:
    return torch.randn(*SVD_SHAPE, generator=torch.Generator().manual_seed(SVD_SEED))


def temporaries(path: Path) -> set[Path]:
    """Temporary files of saves aimed at ``path`` (``save_safetensors_atomic`` names them ``.<name>.*.tmp``)."""
    return set(path.parent.glob(f".{path.name}.*.tmp"))


class Writers:
    """The child process above: ``start`` forks a writer, ``kill`` SIGKILLs it."""

    def __init__(self) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath},
        )
        self.buffer = b""
        self.lines: list[str] = []  # since the last start
        self._read_line("loaded", timeout=120.0)

    def _next_line(self, deadline: float) -> str:
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"the writer went silent: {self.stop()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"the writers' parent died: {self.stop()}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(line.decode())
        return self.lines[-1]

    def _read_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not (line := self._next_line(deadline)).startswith(prefix):
            if line.startswith("reaped"):
                raise AssertionError(f"the writer died: {self.stop()}")
        return line

    def start(self, kind: str, path: Path, arg: dict) -> int:
        """Fork a writer of ``kind`` to ``path``; returns its pid once its first save has returned."""
        self.lines = []
        self.process.stdin.write(json.dumps([kind, str(path), arg]).encode() + b"\n")
        self.process.stdin.flush()
        pid = int(self._read_line("forked ", timeout=30.0).split()[1])
        self._read_line("saved 0", timeout=60.0)
        return pid

    def kill(self, pid: int) -> list[int]:
        """SIGKILL the writer; returns the versions whose save had returned before it died."""
        os.kill(pid, signal.SIGKILL)
        line = self._read_line("reaped", timeout=30.0)  # the child waited for it: its output is complete
        assert line == f"reaped {int(signal.SIGKILL)}", f"the writer was not killed by the signal: {line}"
        return [int(line.split()[1]) for line in self.lines if line.startswith("saved ")]

    def stop(self) -> str:
        """End the child (a forked writer still running is killed by its pid); returns its stderr."""
        for line in self.lines:
            if line.startswith("forked "):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[1]), signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        stderr = self.process.stderr.read().decode()[-3000:]
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()
        return stderr


def after(seconds: float):
    """A kill moment: some time after the first save, wherever the writer then is."""
    return lambda path, before: time.sleep(seconds)


def _wait_for_partial_file(path: Path, before: set[Path], fraction: float) -> None:
    """Poll until a file being written next to ``path`` (a new one, or ``path`` itself were it written in place)
    holds at least ``fraction`` of a whole file's size, but not all of it."""
    whole = path.stat().st_size
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        for entry in os.scandir(path.parent):
            if Path(entry.path) in before:
                continue
            with contextlib.suppress(FileNotFoundError):  # renamed meanwhile
                if fraction * whole <= entry.stat().st_size < whole:
                    return
        time.sleep(0.0005)
    raise AssertionError(f"never saw a save of {path} in progress")


def save_begins(path: Path, before: set[Path]) -> None:
    """A kill moment: as soon as the next save has created its file."""
    _wait_for_partial_file(path, before, 0.0)


def save_half_written(path: Path, before: set[Path]) -> None:
    """A kill moment: halfway through writing the next save's file."""
    _wait_for_partial_file(path, before, 0.5)


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    return metadata, load_file(str(path))


def same_entry(a, b) -> bool:
    """Same metadata and tensors (the bytes of two saves may differ: the header's key order is not fixed)."""
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def bank_version(method, path: Path) -> int:
    """Load the bank through IMSE and check that it is one whole version; returns that version."""
    method.load_bank(path)
    entries = method.bank.entries
    assert len(entries) == 2 and len({entry.label for entry in entries}) == 1
    version = int(entries[0].label.removeprefix("v"))
    for entry in entries:
        tensors = [entry.descriptor.mean, *entry.code.values()]
        state = entry.optimizer_state["state"][0]
        tensors += [state["step"], state["exp_avg"], state["exp_avg_sq"]]
        assert state["exp_avg"].numel() == BANK_PAYLOAD
        assert all(bool((tensor == version).all()) for tensor in tensors), "a bank mixing two versions"
    return version


def code_version(model: nn.Module, path: Path) -> int:
    """Load the code into ``model`` (names, shapes and source fingerprint checked); returns its version."""
    with safe_open(str(path), framework="pt") as handle:
        version = int(handle.metadata()["version"])
    load_code(path, model)
    code = get_code(model)
    assert len(code) == CODE_LAYERS
    assert all(bool((s == version).all()) for s in code.values()), "a code mixing two versions"
    return version


@pytest.mark.slow  # SIGKILL
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and select on pipes are POSIX")
def test_a_killed_writer_leaves_a_whole_previous_or_new_file(tmp_path):
    # A bank saved for this model's identity (what IMSE's save_bank writes), so that load_bank reads it.
    with pytest.warns(UserWarning, match="no source images"):
        method = create("imse", tiny_vit(), retrieval="top1")
    bank_path = tmp_path / "bank" / "bank.safetensors"
    code_path = tmp_path / "code" / "code.safetensors"
    svd_dir = tmp_path / "svd"
    bank_path.parent.mkdir()
    code_path.parent.mkdir()
    weight = svd_weight()
    cache = SVDCache(svd_dir)
    expected_factors = cache.decompose(weight)  # the entry the svd writers rewrite
    svd_path = cache.path(cache.key(weight))
    svd_entry = read_safetensors(svd_path)
    model = big_code_model()

    targets = {
        "bank": (bank_path, bank_path, {"identity": method.bank_identity(), "payload": BANK_PAYLOAD}),
        "code": (code_path, code_path, {"layers": CODE_LAYERS, "rank": CODE_RANK}),
        "svd": (svd_path, svd_dir, {"shape": list(SVD_SHAPE), "seed": SVD_SEED}),
    }
    # Each file is killed at a moment of every kind; the kinds take turns, so that every writer after the first
    # (and the parent at the end) saves next to the leftovers of the ones killed before it.
    moments = [("after 50-250 ms", None), ("save begins", save_begins), ("save half written", save_half_written)]
    delays = {"bank": 0.05, "code": 0.15, "svd": 0.25}
    rounds = [(kind, label, moment or after(delays[kind])) for label, moment in moments for kind in targets]
    writers = Writers()
    mid_write = {kind: [] for kind in targets}  # moments whose kill left a temporary file: it hit a save
    try:
        for kind, label, moment in rounds:
            path, target, arg = targets[kind]
            before = set(path.parent.iterdir()) - {path}  # leftovers of earlier rounds
            pid = writers.start(kind, target, arg)
            moment(path, before)
            saved = writers.kill(pid)

            # The file holds the last version whose save returned, or the one being saved (renamed, not yet
            # reported): never a mix, never a fragment.
            if kind == "bank":
                assert bank_version(method, path) in (max(saved), max(saved) + 1), label
            elif kind == "code":
                assert code_version(model, path) in (max(saved), max(saved) + 1), label
            else:
                assert same_entry(read_safetensors(path), svd_entry), label  # every version of an entry is equal
                check = SVDCache(svd_dir)
                got = check.decompose(weight)
                assert check.hits == 1 and check.rejected == 0 and check.misses == 0, label
                assert all(torch.equal(g, e) for g, e in zip(got, expected_factors)), label
                entries = [p for p in svd_dir.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
                assert entries == [path], label  # a temporary file is never taken for an entry
            assert set(path.parent.iterdir()) == {path} | temporaries(path), label  # no stray files
            assert before <= temporaries(path), label  # nobody read, renamed or tripped over an old one
            if set(path.parent.iterdir()) - before - {path}:
                mid_write[kind].append(label)
    finally:
        writers.stop()

    # The kills did land inside saves (a temporary file was left): the test tried the fault it claims to survive.
    assert all(mid_write.values()), f"kills that left a temporary file: {mid_write}"
    # The leftovers of killed writers do not get in the way of the next save from this process either.
    method.bank = DomainBank(capacity=3)
    method.bank.store(Descriptor(torch.zeros(64), torch.ones(64)), method.source_code, None, label="after")
    method.save_bank(bank_path)
    method.load_bank(bank_path)
    assert [entry.label for entry in method.bank.entries] == ["after"]
    with torch.no_grad():
        for layer in model:
            layer.S.fill_(-1.0)
    save_code(code_path, model, extra={"version": "-1"})
    assert code_version(big_code_model(), code_path) == -1


def test_a_failed_save_keeps_the_previous_file_and_removes_its_temporary(tmp_path, monkeypatch):
    model = tiny_vit(depth=2)
    inject(model)
    path = save_code(tmp_path / "code.safetensors", model)
    previous = path.read_bytes()

    def disk_full(fd):  # the new bytes are written but cannot be flushed: the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    set_code(model, {name: s + 1 for name, s in get_code(model).items()})  # what a save would change
    with pytest.raises(OSError, match="No space"):
        save_code(path, model)
    bank = DomainBank()
    bank.store(Descriptor(torch.zeros(4), torch.ones(4)), get_code(model), None)
    with pytest.raises(OSError, match="No space"):
        bank.save(path, {"backbone": "x"})
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.safetensors"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_a_save_reaches_the_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """A kill cannot lose data the kernel already has, but a power cut can: the new file's bytes are flushed
    (fsync) before the rename, so the rename never points at a file the disk does not hold yet."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model = tiny_vit(depth=2)
    inject(model)
    path = save_code(tmp_path / "code.safetensors", model)
    replaced = [event for event in events if event[0] == "replace"]
    assert len(replaced) == 1 and replaced[0][2] == str(path)
    temporary = replaced[0][1]
    assert ("fsync", temporary) in events[: events.index(replaced[0])]
    load_code(path, model)


def test_a_leftover_temporary_with_this_saves_name_is_overwritten_and_removed(tmp_path):
    """A killed process whose pid (and thread id) this process now has left its temporary file behind."""
    path = tmp_path / "code.safetensors"
    leftover = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    leftover.write_bytes(b"half of an old save")
    model = tiny_vit(depth=2)
    inject(model)
    save_code(path, model)
    assert not leftover.exists() and load_code(path, model)


def test_the_svd_cache_ignores_a_leftover_temporary_in_place_of_its_entry(tmp_path):
    weight = torch.randn(12, 8)
    other = SVDCache(tmp_path / "other")
    other.decompose(torch.randn(12, 8))  # a complete, valid entry, but of another weight
    cache = SVDCache(tmp_path / "cache")
    path = cache.path(cache.key(weight))
    path.parent.mkdir(parents=True)
    (other_entry,) = (tmp_path / "other").rglob("*.safetensors")
    leftover = path.with_name(f".{path.name}.12345.67890.tmp")
    leftover.write_bytes(other_entry.read_bytes())  # a killed writer's file, complete or not
    got = cache.decompose(weight)
    assert cache.misses == 1 and cache.hits == 0
    assert all(torch.equal(g, e) for g, e in zip(got, decompose(weight)))
    assert leftover.exists() and path.is_file()


# --- Damaged SVD cache entries --------------------------------------------------------------------------------
# Complements tests/test_spectral.py (one flipped byte in the last factor, a short garbage file): damage that
# keeps the file readable and its CRC of the factor bytes valid is the dangerous kind.


def _header(data: bytes) -> tuple[int, bytes]:
    size = int.from_bytes(data[:8], "little")
    return size, data[8 : 8 + size]


def _edit_header(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    size, header = _header(data)
    assert old in header
    return data[:8] + header.replace(old, new) + data[8 + size :]


def _flip_middle(data: bytes) -> bytes:
    size, _ = _header(data)
    middle = 8 + size + (len(data) - 8 - size) // 2
    return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :]


DAMAGE = {
    "truncated to half": lambda data, _: data[: len(data) // 2],
    "truncated by one byte": lambda data, _: data[:-1],
    "zero length": lambda data, _: b"",
    "garbage header": lambda data, _: data[:8] + b"\x07" * _header(data)[0] + data[8 + _header(data)[0] :],
    "huge header length": lambda data, _: (1 << 62).to_bytes(8, "little") + data[8:],
    "random bytes": lambda data, _: random.Random(0).randbytes(len(data)),
    "byte flipped in the middle": lambda data, _: _flip_middle(data),
    "dtype relabelled (same bytes)": lambda data, _: _edit_header(data, b'"F32"', b'"I32"'),
    "shape relabelled (same bytes)": lambda data, _: _edit_header(data, b"[12,8]", b"[8,12]"),
    "entry of another weight": lambda _, other: other,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_svd_cache_entry_is_rebuilt_not_trusted(tmp_path, damage):
    torch.manual_seed(0)
    weight, other_weight = torch.randn(12, 8), torch.randn(12, 8)
    writer = SVDCache(tmp_path)
    writer.decompose(weight)
    writer.decompose(other_weight)
    path = writer.path(writer.key(weight))
    other = writer.path(writer.key(other_weight)).read_bytes()
    path.write_bytes(DAMAGE[damage](path.read_bytes(), other))

    cache = SVDCache(tmp_path)
    got = cache.decompose(weight)
    expected = decompose(weight)
    assert cache.rejected == 1 and cache.misses == 1 and cache.hits == 0
    assert all(g.dtype == e.dtype and torch.equal(g, e) for g, e in zip(got, expected))
    again = SVDCache(tmp_path)  # the entry was rewritten and is good again
    assert all(torch.equal(g, e) for g, e in zip(again.decompose(weight), expected)) and again.hits == 1


def test_an_svd_cache_entry_that_cannot_be_removed_is_still_not_trusted(tmp_path):
    weight = torch.randn(12, 8)
    cache = SVDCache(tmp_path)
    path = cache.path(cache.key(weight))
    (path / "blocker").mkdir(parents=True)  # neither readable as an entry nor removable
    got = cache.decompose(weight)
    assert cache.rejected == 1 and all(torch.equal(g, e) for g, e in zip(got, decompose(weight)))


# --- Missing, unreadable or wrong inputs name themselves ------------------------------------------------------


def raises_naming(path: Path, types, call) -> Exception:
    with pytest.raises(types) as info:
        call()
    assert str(path) in str(info.value), f"{type(info.value).__name__} does not name {path}: {info.value}"
    return info.value


def write_variants(tmp_path: Path, name: str, valid: bytes) -> dict[str, Path]:
    """A missing file, an empty one, garbage, a truncated valid file and a folder in the file's place."""
    files = {"missing": tmp_path / f"missing-{name}"}
    for variant, data in {
        "empty": b"",
        "garbage": b"this is not what it claims to be" * 8,
        "truncated": valid[: len(valid) // 2],
    }.items():
        files[variant] = tmp_path / f"{variant}-{name}"
        files[variant].write_bytes(data)
    files["folder"] = tmp_path / f"folder-{name}"
    files["folder"].mkdir()
    return files


def test_bad_weights_files_are_named(tmp_path):
    from safetensors.torch import save_file

    state = tiny_vit().state_dict()  # a valid file, but of another architecture
    save_file(state, str(tmp_path / "tiny.safetensors"))
    torch.save(state, tmp_path / "tiny.pth")
    errors = (BackboneUnavailable, FileNotFoundError, ValueError)
    for suffix in (".safetensors", ".pth"):
        valid = (tmp_path / f"tiny{suffix}").read_bytes()
        for path in write_variants(tmp_path, f"weights{suffix}", valid).values():
            raises_naming(path, errors, lambda: create_backbone(HUB_NAME, weights=path))
            raises_naming(path, errors, lambda: create_backbone("builtin", weights=path))
        path = tmp_path / f"tiny{suffix}"
        raises_naming(path, errors, lambda: create_backbone(HUB_NAME, weights=path))
        raises_naming(path, errors, lambda: create_backbone("builtin", weights=path))


def test_bad_bank_and_code_files_are_named(tmp_path):
    with pytest.warns(UserWarning, match="no source images"):
        method = create("imse", tiny_vit(depth=4), diversity_blocks=1, retrieval="top1")
    method.save_bank(tmp_path / "bank.safetensors")
    save_code(tmp_path / "code.safetensors", method.model)
    bank_files = write_variants(tmp_path, "bank.safetensors", (tmp_path / "bank.safetensors").read_bytes())
    for path in bank_files.values():
        raises_naming(path, (FileNotFoundError, BankMismatchError), lambda: method.load_bank(path))
    code_files = write_variants(tmp_path, "code.safetensors", (tmp_path / "code.safetensors").read_bytes())
    for path in code_files.values():
        raises_naming(path, (FileNotFoundError, CodeMismatchError), lambda: load_code(path, method.model))
    # A bank where a code is expected, and the other way round.
    raises_naming(tmp_path / "bank.safetensors", CodeMismatchError, lambda: load_code(tmp_path / "bank.safetensors"))
    raises_naming(
        tmp_path / "code.safetensors", BankMismatchError, lambda: method.load_bank(tmp_path / "code.safetensors")
    )


def test_missing_image_folders_are_named(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    raises_naming(missing, FileNotFoundError, lambda: ImageFolderSource(missing))
    raises_naming(missing, FileNotFoundError, lambda: ImageNetCSource(missing, "fog", 3))
    raises_naming(tmp_path / "fog" / "3", FileNotFoundError, lambda: ImageNetCSource(tmp_path, "fog", 3))


def idx_bytes(array: torch.Tensor) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def test_bad_fashion_mnist_files_are_named(tmp_path):
    images, labels = torch.randint(0, 256, (5, 28, 28)), torch.randint(0, 10, (5,))
    images_gz, labels_gz = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"

    def folder(name: str, images_file: bytes, file_name: str = images_gz) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / file_name).write_bytes(images_file)
        (root / labels_gz).write_bytes(gzip.compress(idx_bytes(labels)))
        return root

    good = folder("good", gzip.compress(idx_bytes(images)))
    assert load_idx_split("test", good)[0].shape == (5, 28, 28)
    missing = tmp_path / "nowhere"
    raises_naming(missing, FileNotFoundError, lambda: load_idx_split("test", missing))
    (tmp_path / "empty").mkdir()
    raises_naming(tmp_path / "empty", FileNotFoundError, lambda: load_idx_split("test", tmp_path / "empty"))
    compressed = gzip.compress(idx_bytes(images))
    for name, data, file_name in [
        ("not-gzip", b"plain garbage, not gzip" * 4, images_gz),
        ("gzip-cut", compressed[: len(compressed) // 2], images_gz),
        ("gzip-empty", b"", images_gz),
        ("idx-cut", idx_bytes(images)[:-10], images_gz.removesuffix(".gz")),
        ("idx-garbage", b"\xff" * 64, images_gz.removesuffix(".gz")),
    ]:
        root = folder(name, data, file_name)
        raises_naming(root / file_name, (ValueError, FileNotFoundError), lambda: load_idx_split("test", root))
