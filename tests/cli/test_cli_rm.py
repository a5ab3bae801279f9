"""``torchstow rm`` (and ``torchstow.delete``) while a save is in flight at the location:
refused with ``SaveInFlightError`` (nothing deleted) the way gc leaves such a save alone,
unless ``--force`` (``force=True``); once the save's files are older than gc's grace
period, they are debris."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.errors import SaveInFlightError
from torchstow.format.files import MANIFEST
from torchstow.management.gc import GRACE

from cli_helpers import S3_KEYS, assert_one_line_error, invoke
from waits import wait_until

gc_module = importlib.import_module("torchstow.management.gc")  # the module (the package exports gc())

_SAVER = """
import sys, torch, torchstow
torchstow.save({"w": torch.arange(4096.0)}, sys.argv[1], overwrite=sys.argv[2] == "1")
"""


def _data_files(where: Path) -> set[str]:
    return {n for n in os.listdir(where) if n.startswith("data-")} if where.exists() else set()


@pytest.fixture
def saving(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, set[str]]]:
    """A save in flight at ``tmp_path/ckpt`` (over a committed checkpoint when the test is
    parametrized with True): its process has written its data and hangs before committing.
    Yields the location and the committed checkpoint's data files."""
    where = tmp_path / "ckpt"
    overwrite = request.param
    if overwrite:
        torchstow.save({"w": torch.zeros(4096)}, str(where))
    committed = _data_files(where)
    uri = f"faulty+file://{where}?fail=finish&mode=hang"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, uri, "1" if overwrite else "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
    )
    try:

        def written() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return bool(_data_files(where) - committed)

        wait_until(written, what="the save's data files")
        yield where, committed
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("saving", [False, True], ids=["fresh", "overwrite"], indirect=True)
def test_rm_refuses_a_save_in_flight_unless_forced(saving: tuple[Path, set[str]]) -> None:
    where, committed = saving
    before = sorted(os.listdir(where))
    refused = invoke("rm", str(where))
    assert_one_line_error(refused, "a save may be in flight", "nothing was deleted", "--force")
    assert "torchstow.errors.SaveInFlightError" in invoke("rm", "--debug", str(where)).err  # its type
    assert sorted(os.listdir(where)) == before  # nothing deleted
    if committed:
        assert torch.equal(torchstow.read(str(where))["w"], torch.zeros(4096))  # still whole
    assert invoke("rm", "--force", str(where)).code == 0
    assert not where.exists()


@pytest.mark.parametrize("saving", [False], indirect=True)
def test_rm_removes_what_a_save_left_once_older_than_gcs_grace_period(
    saving: tuple[Path, set[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    where, _ = saving
    later = time.time() + GRACE + 60  # the save's files are past gc's grace period: debris
    monkeypatch.setattr(gc_module, "time", SimpleNamespace(time=lambda: later))
    assert invoke("rm", str(where)).code == 0
    assert not where.exists()


@pytest.mark.parametrize("saving", [False, True], ids=["fresh", "overwrite"], indirect=True)
def test_the_python_delete_refuses_a_save_in_flight_unless_forced(saving: tuple[Path, set[str]]) -> None:
    where, committed = saving
    before = sorted(os.listdir(where))
    with pytest.raises(SaveInFlightError, match=r"a save may be in flight.*nothing was deleted.*force=True"):
        torchstow.delete(str(where))
    assert sorted(os.listdir(where)) == before  # nothing deleted
    if committed:
        assert torch.equal(torchstow.read(str(where))["w"], torch.zeros(4096))  # still whole
    torchstow.delete(str(where), force=True)
    assert not where.exists()


def test_rm_reads_the_manifest_and_lists_the_location_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-flight check and the deletion share one read of the manifest (and of its
    chunk table) and one listing for the check."""
    where = tmp_path / "ckpt"
    torchstow.save({"w": torch.arange(4096.0)}, str(where))
    reads: list[str] = []
    lists: list[int] = []
    read_file, list_files = LocalFileStore.read_file, LocalFileStore.list_files
    monkeypatch.setattr(
        LocalFileStore, "read_file", lambda self, name: reads.append(name) or read_file(self, name)
    )
    monkeypatch.setattr(LocalFileStore, "list_files", lambda self: lists.append(1) or list_files(self))
    assert invoke("rm", str(where)).code == 0
    assert not where.exists()
    assert reads.count(MANIFEST) == 1 and len(reads) == 2, reads  # the manifest and its chunk table
    assert len(lists) <= 2, lists  # the check's and the backend's delete's own


def test_delete_in_a_bucket_that_does_not_exist_is_checkpoint_not_found(cli_s3: str) -> None:
    """No bucket, no save in flight: delete says there is no checkpoint (CheckpointNotFoundError,
    as before the in-flight check), not the S3 error of listing the bucket's uploads."""
    options = {"endpoint_url": cli_s3, **S3_KEYS}
    with pytest.raises(torchstow.CheckpointNotFoundError, match="no checkpoint at"):
        torchstow.delete("s3://no-such-bucket-for-rm/run/step-1", storage_options=options)


def test_rm_of_a_checkpoint_leaves_a_users_own_files_in_its_folder(tmp_path: Path) -> None:
    """rm deletes what torchstow wrote there, not every ``data-*.bin``: a user's notes kept
    in the checkpoint's folder stay, and so does the folder."""
    where = tmp_path / "ckpt"
    torchstow.save({"w": torch.arange(4096.0)}, str(where))
    (where / "data-notes.bin").write_bytes(b"mine")
    (where / "README").write_text("mine too")
    assert invoke("rm", str(where)).code == 0
    assert sorted(os.listdir(where)) == ["README", "data-notes.bin"]
    assert (where / "data-notes.bin").read_bytes() == b"mine"


def test_delete_removes_a_data_file_its_manifest_names_whatever_its_name(tmp_path: Path) -> None:
    """A data file the manifest names goes even when torchstow would not have named it so
    (a manifest another writer produced): deleting the checkpoint leaves none of its data."""
    where = tmp_path / "ckpt"
    torchstow.save({"w": torch.arange(8.0)}, str(where), format_version=1)  # JSON: rewritten below
    (written,) = _data_files(where)
    os.rename(where / written, where / "data-renamed.bin")
    doc = json.loads((where / MANIFEST).read_text())
    doc["files"] = ["data-renamed.bin"]
    (where / MANIFEST).write_text(json.dumps(doc))
    assert torch.equal(torchstow.read(str(where))["w"], torch.arange(8.0))  # a sound checkpoint
    torchstow.delete(str(where))
    assert not where.exists()


def test_rm_of_a_symbolic_link_is_refused_and_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link (latest -> step-300) is no checkpoint of its own: rm through it deleted the
    files of the checkpoint it points at and left the link dangling (through fsspec's local
    filesystem, or a wrapper that transforms bytes, until the link was seen there too)."""
    from xor_wrapper import XorBackend, install

    install(monkeypatch, XorBackend)
    where = tmp_path / "step-300"
    torchstow.save({"w": torch.arange(4096.0)}, str(where))
    before = sorted(os.listdir(where))
    os.symlink("step-300", tmp_path / "latest")
    links = [str(tmp_path / "latest"), f"{tmp_path}/latest/", f"file://{tmp_path}/latest"]
    links += [f"fsspec+file://{tmp_path}/latest", f"xor+file://{tmp_path}/latest"]
    for link in links:
        options = ("-o", "xor.key=7") if link.startswith("xor+") else ()
        for force in ((), ("--force",)):
            refused = invoke("rm", link, *force, *options)
            assert_one_line_error(refused, "symbolic link", os.path.realpath(where), "nothing was deleted")
        xor = {"xor.key": 7} if options else None
        with pytest.raises(ValueError, match="symbolic link"):
            torchstow.delete(link, force=True, storage_options=xor)
    assert sorted(os.listdir(where)) == before and os.readlink(tmp_path / "latest") == "step-300"
    assert torch.equal(torchstow.read(str(tmp_path / "latest"))["w"], torch.arange(4096.0))


@pytest.mark.parametrize("left", [[".metadata", "__0_0.distcp"], ["__0_0.distcp"]])
def test_rm_also_removes_a_replaced_dcp_checkpoint_that_outlived_its_replacement(
    tmp_path: Path, left: list[str]
) -> None:
    """A torchstow save over a DCP checkpoint removes DCP's files after it commits; killed
    in between, they stay beside the manifest. Before: rm removed the torchstow checkpoint
    and left them, and the location read as the old DCP checkpoint again (restore loaded it)."""
    import torch.distributed.checkpoint as dcp

    where = tmp_path / "step-5"
    dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(where), no_dist=True)
    old = {name: (where / name).read_bytes() for name in left}
    torchstow.save({"w": torch.ones(4)}, str(where), overwrite=True)
    for name, data in old.items():  # the kill between the commit and their removal
        (where / name).write_bytes(data)
    assert torch.equal(torchstow.read(str(where))["w"], torch.ones(4))  # the manifest wins
    assert invoke("rm", str(where)).code == 0
    assert not where.exists()
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.CheckpointManager(tmp_path).restore({"w": torch.zeros(4)})
