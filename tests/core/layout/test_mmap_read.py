"""read(mmap=True): tensors that map the data files, bit-exact, copy-on-write,
checksums verified unless verify=False; local files and shm:// only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from manifest_json import manifest_doc
from state_helpers import ALL_DTYPES
from torchstow.testing import assert_same_state


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    return {
        "model": {
            "big": torch.randn(512, 1024, generator=gen),  # 2 MiB: a 4 KiB-aligned item
            "empty": torch.empty(0, 3),
            "dtypes": [torch.randint(0, 100, (3, 5), generator=gen).to(d) for d in ALL_DTYPES],
        },
        "step": 12,
        "extra": {"betas": (0.9, 0.99), "when": b"bytes are not JSON"},
    }


def _mapped_files() -> dict[int, str]:
    """Start address -> file, for this process's file mappings."""
    found = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().endswith(".bin"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found[lo] = (hi, parts[5].strip())
    return found  # type: ignore[return-value]


def _file_of(tensor: torch.Tensor) -> str | None:
    """The data file ``tensor``'s memory maps, if any."""
    ptr = tensor.data_ptr()
    for lo, (hi, path) in _mapped_files().items():  # type: ignore[misc]
        if lo <= ptr < hi:
            return str(path)
    return None


def test_mapped_read_is_bit_exact_and_maps_the_data_files(ckpt: str) -> None:
    state = _state()
    torchstow.save(state, ckpt, storage_options={"fsync": False})
    got = torchstow.read(ckpt, mmap=True)
    assert_same_state(got, state)
    mapped = _file_of(got["model"]["big"])
    assert mapped is not None and os.path.dirname(mapped) == ckpt
    assert all(_file_of(t) is not None for t in got["model"]["dtypes"])
    assert _file_of(torchstow.read(ckpt)["model"]["big"]) is None  # a plain read copies


def test_writing_to_a_mapped_tensor_copies_on_write_and_leaves_the_file_alone(ckpt: str) -> None:
    state = _state()
    torchstow.save(state, ckpt, storage_options={"fsync": False})
    got = torchstow.read(ckpt, mmap=True)
    got["model"]["big"].add_(1.0)
    assert torch.equal(got["model"]["big"], state["model"]["big"] + 1.0)
    assert_same_state(torchstow.read(ckpt, mmap=True), state)


def _flip_a_byte_of(ckpt: str, key: str) -> None:
    manifest = manifest_doc(ckpt)
    entry = manifest["entries"][key]
    path = Path(ckpt, manifest["files"][entry["file"]])
    data = bytearray(path.read_bytes())
    data[entry["offset"] + entry["length"] // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mmap", [True, False], ids=["mapped", "copied"])
def test_a_flipped_byte_is_caught_when_verifying_and_goes_unnoticed_without(ckpt: str, mmap: bool) -> None:
    state = _state()
    torchstow.save(state, ckpt, storage_options={"fsync": False})
    _flip_a_byte_of(ckpt, "model.big")
    with pytest.raises(torchstow.ChecksumMismatchError, match=r"'model\.big'.*data-.*\.bin bytes"):
        torchstow.read(ckpt, mmap=mmap)
    unverified = torchstow.read(ckpt, mmap=mmap, verify=False)  # documented: verify=False skips the check
    assert not torch.equal(unverified["model"]["big"], state["model"]["big"])
    assert torch.equal(unverified["model"]["dtypes"][0], state["model"]["dtypes"][0])


def test_shared_memory_checkpoints_map_too(shm_dir: str) -> None:
    state = _state()
    uri = "shm://run/step-1"
    torchstow.save(state, uri, storage_options={"shm_dir": shm_dir})
    got = torchstow.read(uri, mmap=True, storage_options={"shm_dir": shm_dir}, keys="model")
    assert_same_state(got, {"model": state["model"]})
    mapped = _file_of(got["model"]["big"])
    assert mapped is not None and mapped.startswith(shm_dir)


def test_only_local_checkpoints_can_be_mapped(ckpt: str) -> None:
    torchstow.save({"x": torch.ones(3)}, ckpt)
    with pytest.raises(ValueError, match=r"read\(mmap=True\) maps local files"):
        torchstow.read(f"faulty+file://{ckpt}", mmap=True)
