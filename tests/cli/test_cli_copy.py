"""``torchstow cp`` as ``cp`` and ``aws s3 cp`` users read it: DST/ means into, a run copies
every committed checkpoint, and a DCP checkpoint stays DCP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.management import copy_run

from cli_helpers import fails, invoke, json_doc


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Two committed checkpoints and a save that did not finish."""
    for step in (1, 2):
        torchstow.save({"w": torch.full((4,), float(step))}, str(tmp_path / "run" / f"step-{step}"))
    (tmp_path / "run" / "step-3").mkdir()
    (tmp_path / "run" / "step-3" / "data-0123456789ab-0-0.bin").write_bytes(b"partial")
    return tmp_path / "run"


def test_a_trailing_slash_copies_into(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    doc = json_doc("cp", str(run / "step-1"), f"{out}/")
    assert doc["dst"] == f"{out}/step-1"
    assert sorted(os.listdir(out)) == ["step-1"]
    assert torch.equal(torchstow.read(str(out / "step-1"))["w"], torch.full((4,), 1.0))
    # without the slash, a directory that holds checkpoints is not turned into one
    err = fails("cp", str(run / "step-2"), str(out))
    assert "holds other locations" in err and f"{out}/ as the destination" in err
    assert sorted(os.listdir(out)) == ["step-1"]
    assert torchstow.copy(str(run / "step-2"), f"{out}/") == f"{out}/step-2"  # the Python call too


def test_a_copy_into_keeps_the_sources_own_name_across_uri_rules(tmp_path: Path) -> None:
    """The folder ``a%20b`` copied into a folder keeps its name, whether either side is a
    plain path (literal), a ``file://`` URI (percent-decoded) or ``fsspec+file://``
    (literal); so do a run's and its checkpoints'. Before, the last segment was taken as
    written: ``file:///src/a%2520b`` landed as ``a%2520b`` under a plain path, and a plain
    ``a%20b`` as ``a b`` under a ``file://`` one."""
    src = tmp_path / "src"
    torchstow.save({"w": torch.ones(2)}, str(src / "a%20b"))
    torchstow.save({"w": torch.ones(2)}, str(src / "run%1" / "step%1"))
    spellings = {
        "plain": str(src),
        "file": f"file://{src}".replace("%", "%25"),
        "fsspec": f"fsspec+file://{src}",
    }
    for kind, root in spellings.items():
        for to in ("plain", "file"):
            out = tmp_path / f"out-{kind}-{to}"
            into = f"{out}/" if to == "plain" else f"file://{out}/"
            landed = torchstow.copy(f"{root}/{'a%2520b' if kind == 'file' else 'a%20b'}", into)
            assert torch.equal(torchstow.read(landed)["w"], torch.ones(2))
            assert len(copy_run(f"{root}/{'run%251' if kind == 'file' else 'run%1'}", into).copied) == 1
            assert os.listdir(out / "run%1") == ["step%1"], (kind, to)
            assert sorted(os.listdir(out))[0] == "a%20b", (kind, to)


def test_cp_of_a_run_copies_each_committed_checkpoint(run: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    doc = json_doc("cp", str(run), str(dst))
    assert [(c["src"], c["dst"]) for c in doc["checkpoints"]] == [
        (f"{run}/step-{s}", f"{dst}/step-{s}") for s in (1, 2)
    ]
    ((skipped),) = doc["skipped"]
    assert skipped["uri"] == f"{run}/step-3" and skipped["reason"].startswith("incomplete")
    assert [i.step for i in torchstow.list_checkpoints(str(dst))] == [1, 2]
    assert not (dst / "step-3").exists()

    torchstow.save({"w": torch.zeros(1)}, str(run / "step-4"))
    err = fails("cp", str(run), str(dst))  # step-1 and step-2 are there already
    assert f"{dst}/step-1, {dst}/step-2" in err and "nothing was copied" in err
    assert not (dst / "step-4").exists()
    text = invoke("cp", str(run), str(dst), "--overwrite")
    assert text.code == 0, text
    assert text.out.splitlines()[-1] == "copied 3 checkpoints, skipped 1"
    assert f"skipped {run}/step-3 (incomplete" in text.err
    into = json_doc("cp", str(run), f"{tmp_path / 'into'}/")  # into: DST/run/step-N
    assert into["dst"] == f"{tmp_path / 'into'}/run"  # where the run landed (before: DST/ as given)
    assert json_doc("cp", str(run), f"{dst}/", "--overwrite")["dst"] == f"{dst}/run"
    assert [i.step for i in torchstow.list_checkpoints(str(tmp_path / "into" / "run"))] == [1, 2, 4]


def test_cp_of_a_run_into_itself_is_refused(run: Path, tmp_path: Path) -> None:
    # before: run/sub/step-1 and run/sub/step-2 were written inside the run being copied
    for dst in (f"{run}/sub", f"{run}/", f"{tmp_path}/x/../run/sub"):
        assert "lies inside the other" in fails("cp", str(run), dst)
    assert sorted(os.listdir(run)) == ["step-1", "step-2", "step-3"]
    json_doc("cp", str(run), str(tmp_path))  # beside it: tmp_path/step-N, outside the run
    assert [i.step for i in torchstow.list_checkpoints(str(tmp_path))] == [1, 2]


def test_cp_of_a_torch_save_file_says_to_convert_it(tmp_path: Path) -> None:
    # before: "nothing under model.pt: it does not exist or is empty" (or a raw NotADirectoryError)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    err = fails("cp", str(tmp_path / "model.pt"), str(tmp_path / "out"))
    assert "model.pt is a torch checkpoint" in err and "torchstow convert" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("in_kernel", [True, False], ids=["in-kernel", "through-memory"])
def test_cp_of_a_dcp_checkpoint_copies_it_as_dcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_kernel: bool
) -> None:
    if not in_kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    src = tmp_path / "dcp" / "step-5"
    state = {"w": torch.arange(12.0).reshape(3, 4), "note": "dcp"}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    dst = tmp_path / "copy"
    doc = json_doc("cp", str(src), str(dst))
    assert doc["nbytes"] == torchstow.info(str(src)).nbytes
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    for name in os.listdir(src):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    loaded = {"w": torch.zeros(3, 4), "note": ""}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(dst)), no_dist=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["note"] == "dcp"

    assert "already exists" in fails("cp", str(src), str(dst))
    assert invoke("cp", str(src), str(dst), "--overwrite").code == 0

    (distcp,) = [n for n in os.listdir(src) if n.endswith(".distcp")]
    with open(src / distcp, "r+b") as f:
        f.truncate(10)
    err = fails("cp", str(src), str(tmp_path / "cut"))
    assert f"{src}/{distcp} is 10 bytes" in err
    with pytest.raises(
        torchstow.CorruptCheckpointError, match=f"{distcp} holds 10 bytes.*nothing was copied"
    ):
        torchstow.copy(str(src), str(tmp_path / "cut"))
    assert not (tmp_path / "cut").exists() or os.listdir(tmp_path / "cut") == []


def test_cp_never_nests_checkpoints_in_a_checkpoints_folder(run: Path, tmp_path: Path) -> None:
    """Before: ``cp RUN CKPT`` copied the run's checkpoints into CKPT's folder (exit 0), after
    which ``ls CKPT`` listed them instead of it, and ``rm CKPT`` left them there."""
    ckpt = tmp_path / "ckpt"
    torchstow.save({"w": torch.zeros(1)}, str(ckpt))
    before = sorted(os.listdir(ckpt))
    for args in ((run, ckpt), (run, f"{ckpt}/"), (run, ckpt, "--overwrite"), (run / "step-1", f"{ckpt}/")):
        error = fails("cp", *map(str, args))
        assert f"{ckpt} is a checkpoint, so it is no place for" in error and "nothing was copied" in error
    with pytest.raises(ValueError, match="is a checkpoint, so it is no place for a run's checkpoints"):
        copy_run(str(run), str(ckpt))
    assert sorted(os.listdir(ckpt)) == before


def test_cp_overwrite_never_replaces_a_checkpoint_through_a_link(run: Path, tmp_path: Path) -> None:
    """A run copied over another whose ``latest`` links to its step-1: before, step-1 was
    replaced by the source's ``latest`` (step 2's state under step-1's name), silently."""
    dst = tmp_path / "dst"
    for step in (1, 2):
        torchstow.save({"w": torch.full((4,), 10.0 + step)}, str(dst / f"step-{step}"))
    (dst / "latest").symlink_to("step-1")
    (run / "latest").symlink_to("step-2")
    before = {name: sorted(os.listdir(dst / name)) for name in ("step-1", "step-2")}

    error = fails("cp", str(run), str(dst), "--overwrite")
    assert f"{dst}/latest is a symbolic link (to {dst / 'step-1'})" in error
    assert "nothing was copied" in error
    error = fails("cp", str(run / "step-2"), str(dst / "latest"), "--overwrite", "--compression", "zstd")
    assert "overwriting it would replace the checkpoint it points at" in error
    for args in ((str(run), str(dst)), (str(run / "step-2"), str(dst / "latest"))):
        error = fails("cp", *args)  # before: "pass --overwrite", which is refused
        assert f"{dst}/latest is a symbolic link to the checkpoint {dst / 'step-1'}" in error
        assert "or remove the link first (overwrite is refused through a link)" in error
    assert {name: sorted(os.listdir(dst / name)) for name in ("step-1", "step-2")} == before
    assert torch.equal(torchstow.read(str(dst / "step-1"))["w"], torch.full((4,), 11.0))


def test_a_run_copy_skips_a_checkpoint_pruned_while_it_runs(run: Path, tmp_path: Path) -> None:
    """A training job's retention deletes step-2 while the run is copied (here: once step-1's
    bytes are on their way). Before, the copy failed there with nothing after step-1 copied,
    and a retry was refused (step-1 exists) unless --overwrite."""
    from torchstow.management import copy_run

    torchstow.save({"w": torch.full((4,), 4.0)}, str(run / "step-4"))
    pruned: list[str] = []

    def prune_step_2(done: int, total: int) -> None:
        if not pruned:
            pruned.append(str(run / "step-2"))
            torchstow.delete(pruned[0])

    result = copy_run(str(run), str(tmp_path / "backup"), progress=prune_step_2)
    assert pruned
    assert result.copied == [(str(run / f"step-{s}"), str(tmp_path / "backup" / f"step-{s}")) for s in (1, 4)]
    assert (str(run / "step-2"), "deleted since it was listed") in result.skipped
    assert torch.equal(torchstow.read(str(tmp_path / "backup" / "step-4"))["w"], torch.full((4,), 4.0))
    assert not os.path.exists(tmp_path / "backup" / "step-2" / "manifest.json")


def test_cp_into_a_safetensors_folder_is_refused(run: Path, tmp_path: Path) -> None:
    """Before: the copy landed beside the shards and reported success, but info, inspect and
    verify of the folder went on reading the safetensors (cp --compression refused it)."""
    hf = tmp_path / "hf"
    torchstow.convert(str(run / "step-1"), str(hf), to="safetensors")
    before = sorted(os.listdir(hf))
    for extra in ((), ("--overwrite",), ("--compression", "zstd")):
        assert "holds a safetensors checkpoint" in fails("cp", str(run / "step-2"), str(hf), *extra)
    assert sorted(os.listdir(hf)) == before


def test_a_run_copy_keeps_each_checkpoint_name_across_uri_forms(tmp_path: Path) -> None:
    """A file:// URI is percent-decoded and a plain path is not, so the name ``50%`` is
    ``file:///.../50%25`` in a file:// listing. Before, a run copied from a file:// URI to a
    plain path landed as ``50%25`` (the listing's spelling taken as the name), and from a
    plain path to a file:// URI ``a%20b`` landed as ``a b``; so did one checkpoint copied into
    a folder (``cp file:///.../50%25 DST/``)."""
    from torchstow.management import copy_run

    run = tmp_path / "run"
    names = ["50%", "a%20b", "a b"]
    for value, name in enumerate(names):
        torchstow.save({"w": torch.full((2,), float(value))}, str(run / name))
    for src, dst in ((run.as_uri(), str(tmp_path / "plain")), (str(run), (tmp_path / "uri").as_uri())):
        copy_run(src, dst)
    (tmp_path / "one").mkdir()
    for name in names:  # one checkpoint into a folder: file:///.../50%25 to one/, and back
        assert torchstow.copy((run / name).as_uri(), f"{tmp_path / 'one'}/") == str(tmp_path / "one" / name)
    for folder in ("plain", "uri", "one"):
        assert sorted(os.listdir(tmp_path / folder)) == sorted(names)
        for value, name in enumerate(names):
            copied = torchstow.read(str(tmp_path / folder / name))["w"]
            assert torch.equal(copied, torch.full((2,), float(value)))
