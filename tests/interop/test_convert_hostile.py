"""convert from outside: onto itself, onto an existing checkpoint, from a hostile
safetensors index, and a DCP write that fails half-way."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchstow
from torchstow.interop.safetensors_format import INDEX

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(64.0).reshape(8, 8), "a.bias": torch.arange(8.0)}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _hf(folder: Path) -> Path:
    torchstow.convert(_ts(folder.parent / f"{folder.name}-src"), folder, to="safetensors")
    return folder


def _ts(path: Path) -> Path:
    torchstow.save(_tensors(), path)
    return path


def _dcp(path: Path) -> Path:
    dcp.save(_tensors(), checkpoint_id=str(path), no_dist=True)
    return path


@pytest.mark.parametrize(
    ("make", "to"),
    [(_hf, "safetensors"), (_dcp, "dcp"), (_ts, "torchstow"), (_hf, "dcp"), (_dcp, "safetensors")],
)
@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dot-dot", "symlink", "file-uri"])
def test_convert_onto_itself_is_refused_and_loses_nothing(
    tmp_path: Path, make: object, to: str, spelling: str
) -> None:
    src = make(tmp_path / "ckpt")  # type: ignore[operator]
    before = _snapshot(src)
    if spelling == "same":
        dst = str(src)
    elif spelling == "trailing-slash":
        dst = str(src) + "/"
    elif spelling == "dot-dot":
        (tmp_path / "other").mkdir()
        dst = str(tmp_path / "other" / ".." / "ckpt")
    elif spelling == "symlink":
        os.symlink(src, tmp_path / "alias")
        dst = str(tmp_path / "alias")
    else:
        dst = f"file://{src}"
    with pytest.raises(ValueError, match=r"onto itself|inside"):
        torchstow.convert(src, dst, to=to, overwrite=True)
    assert _snapshot(src) == before


def test_convert_into_a_folder_holding_the_source_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(_tensors(), str(folder / "model-00001-of-00001.safetensors"))
    before = _snapshot(folder)
    shard = folder / "model-00001-of-00001.safetensors"
    with pytest.raises(ValueError, match="inside"):
        torchstow.convert(shard, folder, to="safetensors", overwrite=True)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("existing", [_dcp, _ts, _hf])
def test_convert_to_dcp_onto_a_checkpoint_needs_overwrite(tmp_path: Path, existing: object) -> None:
    src = _ts(tmp_path / "src")
    dst = existing(tmp_path / "dst")  # type: ignore[operator]
    before = _snapshot(dst)
    with pytest.raises(torchstow.CheckpointExistsError, match="overwrite") as refused:
        torchstow.convert(src, dst, to="dcp")
    assert _snapshot(dst) == before
    # a DCP target is replaced in place: the refusal must not promise the old one stays valid
    assert "stays valid" not in str(refused.value)


def test_convert_to_dcp_with_overwrite_replaces_a_dcp_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "src"
    torchstow.save({"x": torch.ones(3)}, src)
    dst = _dcp(tmp_path / "dst")
    (dst / "__1_0.distcp").write_bytes(b"a second rank's data of the old checkpoint")
    torchstow.convert(src, dst, to="dcp", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == [".metadata", "__0_0.distcp"]
    assert list(torchstow.read(dst)) == ["x"]
    assert torch.equal(torchstow.read(dst)["x"], torch.ones(3))


def test_a_failed_convert_to_dcp_is_a_torchstow_error_and_leaves_nothing(tmp_path: Path) -> None:
    src = _ts(tmp_path / "src")
    data = next(p for p in src.iterdir() if p.name.startswith("data-"))
    data.write_bytes(data.read_bytes()[:-1])  # the last tensor no longer reads
    dst = tmp_path / "out"
    with pytest.raises(torchstow.CorruptCheckpointError) as info:
        torchstow.convert(src, dst, to="dcp")
    assert isinstance(info.value, Exception)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("src",)]


def test_a_convert_to_dcp_onto_a_mount_point_replaces_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dst`` stands for a mount point: a rename into it from outside fails with EXDEV, as
    rename(2) does across file systems. The new checkpoint was staged beside ``dst``, so
    with --overwrite the old one's .metadata was gone and the new one never moved in."""
    src = _ts(tmp_path / "src")
    dst = _dcp(tmp_path / "mnt")
    rename = os.replace

    def replace(old: str, new: str) -> None:
        inside = [os.path.abspath(p).startswith(f"{dst}{os.sep}") for p in (old, new)]
        if inside[0] != inside[1]:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(old, new)

    monkeypatch.setattr(os, "replace", replace)
    torchstow.convert(src, dst, to="dcp", overwrite=True)
    loaded = torchstow.read(dst)
    assert all(torch.equal(loaded[k], v) for k, v in _tensors().items())
    assert sorted(p.name for p in dst.iterdir()) == [".metadata", "__0_0.distcp"]


def _index(folder: Path, doc: object) -> Path:
    folder.mkdir(exist_ok=True)
    save_file(_tensors(), str(folder / "model.safetensors"))
    (folder / INDEX).write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/model.safetensors", "sub/../../x"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path: Path, shard: str) -> None:
    save_file(_tensors(), str(tmp_path / "outside.safetensors"))
    if shard.startswith("/"):
        shard = str(tmp_path / "outside.safetensors")
    folder = _index(tmp_path / "hf", {"weight_map": {"a.weight": shard}})
    with pytest.raises(torchstow.CorruptCheckpointError, match="not a plain file name"):
        torchstow.convert(folder, tmp_path / "out", to="torchstow")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "doc",
    [
        "{not json",
        "[1, 2]",
        {"weight_map": ["model.safetensors"]},
        {"weight_map": {"a": 3}},
        {"metadata": {}},
    ],
)
def test_a_malformed_index_is_corrupt_and_names_the_file(tmp_path: Path, doc: object) -> None:
    folder = _index(tmp_path / "hf", doc)
    with pytest.raises(torchstow.CorruptCheckpointError, match=INDEX):
        torchstow.convert(folder, tmp_path / "out", to="torchstow")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["torchstow", "dcp", "safetensors"])
def test_convert_to_a_directory_format_onto_a_file_is_refused(tmp_path: Path, to: str) -> None:
    """As cp refuses it (ValueError: overwrite never replaces a file; before, a
    CheckpointExistsError, and for torchstow a raw [Errno 17] inside a planning failure)."""
    src = _ts(tmp_path / "src")
    dst = tmp_path / "file"
    dst.write_text("keep me")
    with pytest.raises(ValueError, match="it is a file, or lies under one"):
        torchstow.convert(src, dst, to=to, overwrite=True)
    assert dst.read_text() == "keep me"


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_to_torch_onto_a_directory_is_refused(tmp_path: Path, overwrite: bool) -> None:
    """Before: a raw [Errno 21] Is a directory once everything was read (with overwrite), or
    "already exists; pass overwrite=True" (without), which then failed so."""
    src = _ts(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="it is a directory, and torch is written as one file"):
        torchstow.convert(src, tmp_path / "out", to="torch", overwrite=overwrite)
    assert os.listdir(tmp_path / "out") == [] and sorted(os.listdir(tmp_path)) == ["out", "src"]


@pytest.mark.parametrize("to", ["torchstow", "dcp", "safetensors", "torch"])
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_convert_under_a_file_is_refused_as_cp_refuses_it(tmp_path: Path, to: str, scheme: str) -> None:
    """Before: a raw [Errno 20] Not a directory (torch: [Errno 17] File exists), for the
    torchstow target inside a planning failure."""
    src = _ts(tmp_path / "src")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    dst = f"{scheme}{notes / 'sub'}"
    with pytest.raises(ValueError, match=f"cannot convert to .*{notes}/sub: it .*; nothing was written"):
        torchstow.convert(src, dst, to=to, overwrite=True)
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "src"]


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path: Path) -> None:
    """Which copy is meant is not known (the index names one, a loader takes the last)."""
    folder = _index(tmp_path / "hf", {"weight_map": {"a.weight": "model.safetensors", "b": "b.safetensors"}})
    save_file({"a.weight": torch.zeros(8, 8)}, str(folder / "b.safetensors"))
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"'a\.weight' is stored twice"):
        torchstow.convert(folder, tmp_path / "out", to="torchstow")
    assert not (tmp_path / "out").exists()


def test_names_the_safetensors_header_reserves_are_skipped_not_written(tmp_path: Path) -> None:
    """A tensor named ``__metadata__`` made a header no reader parses; a string named
    ``format`` replaced the ``"pt"`` that Hugging Face's loader checks."""
    src = tmp_path / "state.pt"
    torch.save({"__metadata__": torch.ones(2), "format": "v2", "note": "kept", **_tensors()}, src)
    report = torchstow.convert(src, tmp_path / "hf", to="safetensors")
    assert [key for key, _ in report.skipped] == ["__metadata__", "format"]
    shard = str(tmp_path / "hf" / "model-00001-of-00001.safetensors")
    loaded = load_file(shard)
    assert sorted(loaded) == sorted(_tensors())
    with safe_open(shard, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path: Path) -> None:
    """A shard of another version, or one cut short: the conversion would lack the tensor."""
    weight_map = {"a.weight": "model.safetensors", "a.bias": "model.safetensors", "gone": "model.safetensors"}
    folder = _index(tmp_path / "hf", {"weight_map": weight_map})
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"no shard holds, e\.g\. 'gone'"):
        torchstow.convert(folder, tmp_path / "out", to="torchstow")
    assert not (tmp_path / "out").exists()
