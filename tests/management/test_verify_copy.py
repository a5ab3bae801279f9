"""verify, copy, latest(verified=) and the step rule, on real files and shared memory."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.core.layout.location import read_manifest
from torchstow.format.files import BLOCK_SIZE, MANIFEST, is_data_file
from torchstow.management.steps import step_of
from torchstow.management.verify import verify_store
from torchstow.plugins.manager import default_registry
from torchstow.plugins.resolve import route_options
from torchstow.testing import assert_same_state


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(3, 1 << 20, generator=gen),  # 12 MiB: three checksum blocks
        "small": {"a": torch.arange(10), "b": torch.randn(5, generator=gen).to(torch.bfloat16)},
        "meta": {"lr": 0.5, "tag": "x", "shape": torch.Size([2, 3])},
    }


def _data_file(ckpt: str) -> str:
    (name,) = [n for n in os.listdir(ckpt) if is_data_file(n)]
    return os.path.join(ckpt, name)


def _location(ckpt: str, fqn: str) -> Any:
    md = torchstow.storage_reader(ckpt).read_metadata()
    (info,) = [info for index, info in md.storage_data.items() if index.fqn == fqn]
    return info


@pytest.fixture
def saved(tmp_path: Path) -> str:
    ckpt = str(tmp_path / "step-1")
    torchstow.save(_state(), ckpt, storage_options={"thread_count": 1})
    return ckpt


def test_verify_reports_every_byte_checked(saved: str) -> None:
    report = torchstow.verify(saved)
    assert report.ok and report.problems == []
    assert report.checked_bytes == torchstow.info(saved).nbytes
    assert (report.files, report.keys) == (1, 6)
    calls: list[tuple[int, int]] = []
    torchstow.verify(saved, progress=lambda n, total: calls.append((n, total)))
    (total,) = {t for _, t in calls}
    assert sum(n for n, _ in calls) == total >= report.checked_bytes


def test_verify_names_key_file_and_offset_of_a_flipped_byte(saved: str) -> None:
    info = _location(saved, "big")
    path = _data_file(saved)
    with open(path, "r+b") as f:
        f.seek(info.offset + BLOCK_SIZE + 17)  # in the second checksum block of "big"
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    report = torchstow.verify(saved)
    assert not report.ok
    (problem,) = report.problems
    assert (problem.key, problem.file) == ("big", os.path.basename(path))
    assert problem.offset == info.offset + BLOCK_SIZE
    assert "checksum mismatch" in problem.message
    assert report.checked_bytes == torchstow.info(saved).nbytes - info.length
    # the other keys still read, as reading only them never touches the bad block
    assert torch.equal(torchstow.read(saved, keys=["small"])["small"]["a"], torch.arange(10))
    bad = rf"bytes {info.offset + BLOCK_SIZE}\.\.{info.offset + 2 * BLOCK_SIZE} differ"
    with pytest.raises(torchstow.ChecksumMismatchError, match=bad):  # the reader names the same block
        torchstow.read(saved, keys=["big"])


def test_verify_reports_every_bad_block_not_only_the_first(saved: str) -> None:
    big, small = _location(saved, "big"), _location(saved, "small.a")
    path = _data_file(saved)
    with open(path, "r+b") as f:
        for at in (big.offset + 5, big.offset + 2 * BLOCK_SIZE + 9, small.offset + 3):
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
    report = torchstow.verify(saved)
    found = sorted((p.key, p.offset, p.message) for p in report.problems)
    ends = [big.offset + BLOCK_SIZE, big.offset + 3 * BLOCK_SIZE, small.offset + small.length]
    starts = [big.offset, big.offset + 2 * BLOCK_SIZE, small.offset]
    keys = ["big", "big", "small.a"]
    assert found == sorted(
        (key, start, f"checksum mismatch in bytes {start}..{end}: they differ from what was saved")
        for key, start, end in zip(keys, starts, ends)
    )


def test_an_item_whose_checksums_do_not_cover_it_is_reported_and_the_rest_verified(saved: str) -> None:
    store = default_registry().backend_for(saved, None).open_store(saved)
    metadata = read_manifest(store)
    (index,) = [index for index in metadata.storage_data if index.fqn == "big"]
    info = metadata.storage_data[index]
    # a version-2 manifest's locations are a read-only view: replaced, not edited in place
    metadata.storage_data = {
        **metadata.storage_data,
        index: dataclasses.replace(info, checksums=info.checksums[:1]),
    }
    report = verify_store(store, saved, metadata)
    (problem,) = report.problems
    assert (problem.key, problem.offset) == ("big", info.offset)
    assert problem.message == f"the manifest records 1 checksums for {info.length} bytes"
    assert report.checked_bytes == torchstow.info(saved).nbytes - info.length


def test_verify_reports_truncated_missing_and_uncommitted(saved: str, tmp_path: Path) -> None:
    path = _data_file(saved)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    report = torchstow.verify(saved)
    assert not report.ok and any("ends early" in p.message for p in report.problems)
    os.unlink(path)
    report = torchstow.verify(saved)
    assert {p.message for p in report.problems} == {"the data file is missing"}
    assert {p.key for p in report.problems} >= {"big", "small.a"}
    os.unlink(os.path.join(saved, MANIFEST))
    open(path, "wb").close()
    (problem,) = torchstow.verify(saved).problems
    assert problem.key == MANIFEST and "no committed" in problem.message
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.verify(str(tmp_path / "nothing"))


def test_latest_verified_skips_a_corrupt_newest(tmp_path: Path) -> None:
    for step in (1, 2):
        torchstow.save({"w": torch.full((64,), float(step))}, str(tmp_path / f"step-{step}"))
    newest = str(tmp_path / "step-2")
    with open(_data_file(newest), "r+b") as f:
        f.write(b"\xff\xff")
    assert torchstow.latest(str(tmp_path)) == newest
    assert torchstow.latest(str(tmp_path), verified=True) == str(tmp_path / "step-1")


def test_copy_between_backends_is_exact_and_commits_last(saved: str, tmp_path: Path, shm_dir: str) -> None:
    shm = {"shm_dir": shm_dir}
    torchstow.copy(saved, "shm://c/step-1", dst_storage_options=shm)
    back = str(tmp_path / "back")
    calls: list[int] = []
    torchstow.copy("shm://c/step-1", back, src_storage_options=shm, progress=lambda n, _t: calls.append(n))
    assert_same_state(torchstow.read(back), _state())
    assert Path(_data_file(back)).read_bytes() == Path(_data_file(saved)).read_bytes()
    assert sum(calls) == os.path.getsize(_data_file(saved))
    assert torchstow.info(back).committed_at == torchstow.info(saved).committed_at
    with pytest.raises(torchstow.CheckpointExistsError):
        torchstow.copy(saved, back)
    old_file = _data_file(back)
    torchstow.copy(saved, back, overwrite=True)
    assert _data_file(back) != old_file and not os.path.exists(old_file)
    with pytest.raises(ValueError, match="onto itself"):
        torchstow.copy(saved, saved, overwrite=True)


def _kernel_copies(monkeypatch: pytest.MonkeyPatch, works: bool) -> list[int]:
    """Count the in-kernel copies a copy asks for; with ``works`` False the kernel refuses
    them as it does across filesystems (EXDEV)."""
    calls: list[int] = []
    real = os.copy_file_range

    def copy_file_range(src: int, dst: int, count: int, *offsets: Any) -> int:
        calls.append(count)
        if not works:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, count, *offsets)

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return calls


@pytest.mark.parametrize("in_kernel", [True, False], ids=["in-kernel", "through-memory"])
def test_local_copies_are_exact_in_the_kernel_or_through_memory(
    saved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_kernel: bool
) -> None:
    calls = _kernel_copies(monkeypatch, in_kernel)
    dst = str(tmp_path / "copy")
    checked: list[int] = []
    torchstow.copy(saved, dst, progress=lambda n, _t: checked.append(n))
    assert calls  # local to local: the kernel is asked first
    assert Path(_data_file(dst)).read_bytes() == Path(_data_file(saved)).read_bytes()
    assert sum(checked) == os.path.getsize(_data_file(saved))  # every byte checked either way
    assert_same_state(torchstow.read(dst), _state())


@pytest.mark.parametrize("in_kernel", [True, False], ids=["in-kernel", "through-memory"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_copy_of_a_corrupt_checkpoint_fails_and_leaves_nothing(
    saved: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_kernel: bool, damage: str
) -> None:
    _kernel_copies(monkeypatch, in_kernel)
    info = _location(saved, "small.a")
    source = _data_file(saved)
    with open(source, "r+b") as f:
        if damage == "flip":
            f.seek(info.offset)
            f.write(b"\x07")
        else:
            f.truncate(info.offset + 8)
    dst = tmp_path / "copy"
    expected = r"small\.a" if damage == "flip" else "ends early"
    with pytest.raises(torchstow.ChecksumMismatchError, match=expected) as caught:
        torchstow.copy(saved, str(dst))
    assert os.path.basename(source) in str(caught.value)  # the source's file is named
    assert not dst.exists() or os.listdir(dst) == []


@pytest.mark.parametrize(
    ("name", "metadata", "step"),
    [
        ("step-100", None, 100),
        ("checkpoint_100", None, 100),
        ("100", None, 100),
        ("global_step42", None, 42),
        ("iter_0001000", None, 1000),
        ("s3", None, None),
        ("v2", None, None),
        ("final", None, None),
        ("final", {"step": 7}, 7),
        ("step-100", {"step": 5}, 5),
        ("step-100", {"step": True}, 100),
    ],
)
def test_step_rule(name: str, metadata: dict[str, Any] | None, step: int | None) -> None:
    assert step_of(f"s3://bucket/run/{name}/", metadata) == step


def test_options_go_to_the_side_that_takes_them() -> None:
    src, dst = route_options("shm://a", "s3://b/c", {"endpoint_url": "http://h", "thread_count": 2})
    assert src == {"thread_count": 2}
    assert dst == {"endpoint_url": "http://h", "thread_count": 2}
    src, dst = route_options("/x", "/y", {"fsync": False}, {"thread_count": 1})
    assert (src, dst) == ({"fsync": False, "thread_count": 1}, {"fsync": False})
    with pytest.raises(TypeError, match="endpoint_url") as error:
        route_options("/x", "shm://y", {"endpoint_url": "http://h"})
    assert "shm_dir" in str(error.value) and "fsync" in str(error.value)
