"""Every convert target honours ``overwrite`` the same way: onto an existing output
without it, CheckpointExistsError and nothing changed; with it, the output is
replaced (no file of the old one left behind)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.format.codec import peek_manifest
from torchstow.interop.convert import FORMATS
from torchstow.interop.sources import open_source

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

_OLD = {f"old{i}": torch.full((256,), float(i)) for i in range(4)}  # 1 KiB each
_NEW = {"new": torch.arange(5.0)}


def _snapshot(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _output(path: Path) -> dict[str, torch.Tensor]:
    source = open_source(str(path))
    try:
        return {key: source.read_tensor(key) for key in source.specs}
    finally:
        source.close()


def _convert(tmp_path: Path, state: dict[str, torch.Tensor], name: str, to: str, **kwargs: object) -> Path:
    src = tmp_path / name
    torchstow.save(state, src, overwrite=True)
    dst = tmp_path / ("out.pt" if to == "torch" else "out")
    # several safetensors shards in the old output, one in the new
    torchstow.convert(src, dst, to=to, max_shard_bytes=1024, **kwargs)  # type: ignore[arg-type]
    return dst


@pytest.mark.parametrize("to", FORMATS)
def test_convert_onto_an_existing_output_needs_overwrite_and_changes_nothing(tmp_path: Path, to: str) -> None:
    dst = _convert(tmp_path, _OLD, "old", to)
    before = _snapshot(dst)
    with pytest.raises(torchstow.CheckpointExistsError, match="overwrite"):
        _convert(tmp_path, _NEW, "new", to)
    assert _snapshot(dst) == before
    assert list(_output(dst)) == list(_OLD)


@pytest.mark.parametrize("to", FORMATS)
def test_convert_with_overwrite_replaces_the_output(tmp_path: Path, to: str) -> None:
    dst = _convert(tmp_path, _OLD, "old", to)
    _convert(tmp_path, _NEW, "new", to, overwrite=True)
    out = _output(dst)
    assert list(out) == ["new"]
    assert torch.equal(out["new"], _NEW["new"])
    leftover = {Path(f).name for f in set(_snapshot(dst))} - _names_of(dst, to)
    assert not leftover, f"files of the old {to} output left behind: {sorted(leftover)}"


def _names_of(dst: Path, to: str) -> set[str]:
    """The files the new output is made of."""
    if to == "torch":
        return {dst.name}
    if to == "safetensors":
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        return {"model.safetensors.index.json", *index["weight_map"].values()}
    if to == "dcp":
        return {".metadata", "__0_0.distcp"}
    stored = torchstow.storage_reader(dst).read_metadata().storage_data.values()
    table = peek_manifest((dst / "manifest.json").read_bytes()).chunk_table  # version 2: its own table
    return {"manifest.json", *(info.relative_path for info in stored), *([table] if table else [])}


@pytest.mark.parametrize("to", FORMATS)
def test_a_convert_that_fails_with_overwrite_leaves_the_old_output(tmp_path: Path, to: str) -> None:
    dst = _convert(tmp_path, _OLD, "old", to)
    before = _snapshot(dst)
    src = tmp_path / "damaged"
    torchstow.save(_NEW, src)
    data = next(p for p in src.iterdir() if p.name.startswith("data-"))
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF  # found only when the tensor is read, after the output is begun
    data.write_bytes(bytes(raw))
    with pytest.raises(torchstow.CorruptCheckpointError):
        torchstow.convert(src, dst, to=to, overwrite=True)
    assert _snapshot(dst) == before
    assert list(_output(dst)) == list(_OLD)


@pytest.mark.parametrize("to", ["torch", "safetensors"])
def test_converted_files_get_the_usual_permissions(tmp_path: Path, to: str) -> None:
    """Written under a temporary name and renamed, yet readable by others as a plain
    ``open`` makes files (the umask's mode, not mkstemp's 0600)."""
    umask = os.umask(0o022)
    try:
        dst = _convert(tmp_path, _OLD, "old", to)
    finally:
        os.umask(umask)
    files = [dst] if dst.is_file() else list(dst.iterdir())
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


@pytest.mark.parametrize(("old", "to"), itertools.permutations(["torchstow", "dcp", "safetensors"], 2))
def test_an_output_of_another_format_is_refused_with_overwrite(tmp_path: Path, old: str, to: str) -> None:
    """Written beside it, one would hide the other: a torchstow manifest beside safetensors
    shards was read as the shards by info and convert, and as itself by load."""
    dst = _convert(tmp_path, _OLD, "old", old)
    before = _snapshot(dst)
    with pytest.raises(torchstow.CheckpointExistsError, match=f"holds a {old} checkpoint"):
        _convert(tmp_path, _NEW, "new", to, overwrite=True)
    assert _snapshot(dst) == before
