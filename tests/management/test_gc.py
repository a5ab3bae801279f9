"""gc: what killed saves left goes once older than the grace period, on local files and
shared memory; a save in flight and every file a committed manifest names stay."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
import torchstow.planning
from cli.cli_helpers import invoke, json_doc


@pytest.fixture(params=["file", "shm"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any], Path]:
    """``(prefix URI, storage options, its directory)`` on local files or shared memory."""
    if request.param == "file":
        return str(tmp_path / "run"), {}, tmp_path / "run"
    shm = request.getfixturevalue("shm_dir")
    return "shm://run", {"shm_dir": shm}, Path(shm) / "run"


def _debris(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"x" * 100)


def test_old_debris_goes_young_debris_and_committed_files_stay(
    root: tuple[str, dict[str, Any], Path],
) -> None:
    prefix, opts, directory = root
    sd = {"w": torch.randn(1000), "b": torch.randn(10)}
    torchstow.save(sd, f"{prefix}/step-1", storage_options=opts)
    committed = sorted(os.listdir(directory / "step-1"))
    # what two killed saves left: data beside the committed checkpoint, and an incomplete one
    _debris(directory / "step-1", "data-aaaaaaaaaaaa-0-0.bin", "data-aaaaaaaaaaaa-1-0.bin")
    _debris(directory / "step-2", "data-bbbbbbbbbbbb-0-0.bin")
    time.sleep(1.5)
    _debris(directory / "step-3", "data-cccccccccccc-0-0.bin")  # a younger save's, maybe in flight

    dry = torchstow.gc(prefix, older_than=1.0, dry_run=True, storage_options=opts)
    assert sorted(dry.removed) == [
        f"{prefix}/step-1/data-aaaaaaaaaaaa-0-0.bin",
        f"{prefix}/step-1/data-aaaaaaaaaaaa-1-0.bin",
        f"{prefix}/step-2/data-bbbbbbbbbbbb-0-0.bin",
    ]
    assert dry.kept == [f"{prefix}/step-3/data-cccccccccccc-0-0.bin"]
    assert dry.bytes_freed == 300
    assert (directory / "step-2" / "data-bbbbbbbbbbbb-0-0.bin").exists()  # a dry run removes nothing

    report = torchstow.gc(prefix, older_than=1.0, storage_options=opts)
    assert report.removed == dry.removed
    assert sorted(os.listdir(directory / "step-1")) == committed
    assert not (directory / "step-2").exists()  # the incomplete checkpoint, whole
    assert os.listdir(directory / "step-3") == ["data-cccccccccccc-0-0.bin"]
    target = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    torchstow.load(target, f"{prefix}/step-1", storage_options=opts)
    assert torch.equal(target["w"], sd["w"])


def test_a_save_in_flight_is_never_collected(root: tuple[str, dict[str, Any], Path]) -> None:
    prefix, opts, directory = root
    writing, release = threading.Event(), threading.Event()

    class Stalls(torchstow.planning.DefaultSavePlanner):
        def resolve_data(self, item: Any) -> Any:
            if item.index.fqn == "b":
                writing.set()
                release.wait(60)
            return super().resolve_data(item)

    sd = {"a": torch.randn(1 << 18), "b": torch.randn(1 << 18)}
    errors: list[BaseException] = []

    def save() -> None:
        try:
            torchstow.save(
                sd, f"{prefix}/step-1", planner=Stalls(), storage_options={**opts, "thread_count": 2}
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=save)
    thread.start()
    try:
        assert writing.wait(60)
        in_flight = sorted(os.listdir(directory / "step-1"))
        assert in_flight and all(n.startswith("data-") for n in in_flight)
        report = torchstow.gc(prefix, older_than=60, storage_options=opts)
        assert report.removed == []
        # the save's second thread may write its next file while gc runs: gc keeps that one
        # too, so what it kept is every file there before it, and nothing outside the save
        assert all(path.startswith(f"{prefix}/step-1/data-") for path in report.kept)
        assert {f"{prefix}/step-1/{n}" for n in in_flight} <= set(report.kept)
        assert set(in_flight) <= set(os.listdir(directory / "step-1"))
    finally:
        release.set()
        thread.join(60)
    assert errors == []
    # committed: no file its manifest names is ever debris, whatever the grace period
    assert torchstow.gc(prefix, older_than=0, storage_options=opts).removed == []
    assert torch.equal(torchstow.read(f"{prefix}/step-1", storage_options=opts)["b"], sd["b"])


def test_an_incremental_checkpoints_linked_files_are_kept(root: tuple[str, dict[str, Any], Path]) -> None:
    prefix, opts, directory = root
    frozen = torch.randn(1 << 16)
    torchstow.save({"frozen": frozen, "w": torch.zeros(100)}, f"{prefix}/step-1", storage_options=opts)
    sd = {"frozen": frozen, "w": torch.ones(100)}
    torchstow.save(sd, f"{prefix}/step-2", base=f"{prefix}/step-1", storage_options=opts)
    linked = set(os.listdir(directory / "step-1")) & set(os.listdir(directory / "step-2"))
    assert linked - {"manifest.json"}, "the incremental save shares the base's data file"
    torchstow.delete(f"{prefix}/step-1", storage_options=opts)
    report = torchstow.gc(prefix, older_than=0, storage_options=opts)
    assert report.removed == []
    back = torchstow.read(f"{prefix}/step-2", storage_options=opts)
    assert torch.equal(back["frozen"], frozen)
    assert torch.equal(back["w"], sd["w"])


def test_gc_of_one_checkpoint_and_bad_grace_periods(tmp_path: Path) -> None:
    uri = str(tmp_path / "step-1")
    torchstow.save({"w": torch.ones(4)}, uri)
    _debris(tmp_path / "step-1", "data-dddddddddddd-0-0.bin")
    assert torchstow.gc(uri, older_than=0).removed == [f"{uri}/data-dddddddddddd-0-0.bin"]
    _debris(tmp_path / "step-9", "data-eeeeeeeeeeee-0-0.bin")  # an incomplete checkpoint given itself
    assert torchstow.gc(str(tmp_path / "step-9"), older_than=0).removed == [
        f"{tmp_path}/step-9/data-eeeeeeeeeeee-0-0.bin"
    ]
    for bad in (-1, float("nan")):  # nan: every S3 upload, one in flight too, was "older" and aborted
        with pytest.raises(ValueError, match="older_than"):
            torchstow.gc(uri, older_than=bad)


def test_the_gc_verb(tmp_path: Path) -> None:
    torchstow.save({"w": torch.ones(4)}, str(tmp_path / "step-1"))
    _debris(tmp_path / "step-2", "data-ffffffffffff-0-0.bin")
    debris = f"{tmp_path}/step-2/data-ffffffffffff-0-0.bin"

    assert json_doc("gc", str(tmp_path))["kept"] == [debris]  # the default grace period: an hour
    dry = invoke("gc", str(tmp_path), "--older-than", "0", "--dry-run")
    assert dry.code == 0, dry.err
    assert f"would remove {debris}" in dry.out
    assert (tmp_path / "step-2").exists()
    done = invoke("gc", str(tmp_path), "--older-than", "0")
    assert "removed 1 file (100 B)" in done.out, done.out
    assert not (tmp_path / "step-2").exists()
    assert invoke("gc", str(tmp_path), "--older-than", "soon").code == 2


def test_an_unreadable_manifests_location_is_left_alone(tmp_path: Path) -> None:
    torchstow.save({"w": torch.ones(4)}, str(tmp_path / "step-1"))
    (tmp_path / "step-1" / "manifest.json").write_text("{not json")
    _debris(tmp_path / "step-1", "data-abababababab-0-0.bin")
    before = sorted(os.listdir(tmp_path / "step-1"))
    report = torchstow.gc(str(tmp_path), older_than=0)
    assert report.removed == []
    assert list(report.skipped) == [str(tmp_path / "step-1")]
    assert sorted(os.listdir(tmp_path / "step-1")) == before  # its data may be all there is of it


def test_a_copy_in_flight_is_judged_whole(tmp_path: Path) -> None:
    # a copy names its files data-<copy id>-<n>.bin: while it writes its last file, the
    # first ones (done long ago) are part of a copy in flight, not debris of their own
    src, dst = str(tmp_path / "src"), tmp_path / "dst"
    sd = {"a": torch.randn(1 << 18), "b": torch.randn(1 << 18)}
    torchstow.save(sd, src, storage_options={"thread_count": 2})
    torchstow.copy(src, str(dst))
    names = sorted(n for n in os.listdir(dst) if n.startswith("data-"))
    assert len(names) == 2
    for name in os.listdir(dst):  # as it was before the copy committed
        if name not in names:
            (dst / name).unlink()
    time.sleep(1.2)
    os.utime(dst / names[-1])  # the copy is still writing its last file
    report = torchstow.gc(str(dst), older_than=1.0)
    assert report.removed == []
    assert sorted(report.kept) == [f"{dst}/{n}" for n in names]
    assert sorted(os.listdir(dst)) == names


def test_files_torchstow_did_not_name_are_never_collected(tmp_path: Path) -> None:
    # names torchstow never writes, though they start with data- and end with .bin
    theirs = ["data-2024-01-1.bin", "data-train-0.bin", "data-00000-of-00004.bin", "data-notes.bin"]
    torchstow.save({"w": torch.ones(4)}, str(tmp_path / "step-1"))
    _debris(tmp_path / "step-1", "data-aaaaaaaaaaaa-0-0.bin", *theirs)
    _debris(tmp_path / "dataset", *theirs)  # beside the checkpoints: no manifest, no checkpoint
    report = torchstow.gc(str(tmp_path), older_than=0)
    assert report.removed == [f"{tmp_path}/step-1/data-aaaaaaaaaaaa-0-0.bin"]
    assert sorted(os.listdir(tmp_path / "dataset")) == sorted(theirs)
    assert set(theirs) <= set(os.listdir(tmp_path / "step-1"))


def test_dcp_data_left_without_its_metadata_is_shown_reported_and_removed_by_rm(tmp_path: Path) -> None:
    # rm deletes a DCP checkpoint's .metadata first: cut short there (or a DCP save that died),
    # its .distcp files were invisible to ls, gc and rm ("no checkpoint"), kept forever
    import torch.distributed.checkpoint as dcp

    for name in ("half", "whole"):
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(tmp_path / name), no_dist=True)
    (tmp_path / "half" / ".metadata").unlink()
    stray = sorted(os.listdir(tmp_path / "half"))
    assert stray and all(n.endswith(".distcp") for n in stray)
    listed = {e["uri"]: e for e in json_doc("ls", "--all", "--json", str(tmp_path))["checkpoints"]}
    assert listed[str(tmp_path / "half")]["status"] == "incomplete"
    assert ".distcp" in listed[str(tmp_path / "half")]["error"]
    with pytest.raises(torchstow.IncompleteCheckpointError, match=r"\.distcp"):
        torchstow.load({"w": torch.zeros(4)}, str(tmp_path / "half"))
    (problem,) = torchstow.verify(str(tmp_path / "half")).problems  # not "no checkpoint"
    assert ".distcp" in problem.message
    report = torchstow.gc(str(tmp_path), older_than=0)  # reported, left: DCP's saves are not gc's
    assert report.removed == [] and "without its .metadata" in report.skipped[str(tmp_path / "half")]
    assert sorted(os.listdir(tmp_path / "half")) == stray
    with pytest.raises(torchstow.errors.SaveInFlightError):  # young: a DCP save may be writing it
        torchstow.delete(str(tmp_path / "half"))
    assert invoke("rm", "--force", str(tmp_path / "half")).code == 0
    assert not (tmp_path / "half").exists()
    assert torchstow.verify(str(tmp_path / "whole")).ok  # untouched


def test_a_torchstow_checkpoint_beside_a_replaced_dcp_ones_metadata_is_collected(tmp_path: Path) -> None:
    # a torchstow save over a DCP checkpoint, killed before it removed DCP's .metadata: the
    # location reads (and ls shows it) as torchstow's; before: gc skipped it as "a checkpoint
    # in DCP's format", and the debris of a later killed overwrite there stayed for ever
    import torch.distributed.checkpoint as dcp

    where = tmp_path / "step-1"
    dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(where), no_dist=True)
    metadata = (where / ".metadata").read_bytes()
    torchstow.save({"w": torch.ones(4)}, str(where), overwrite=True)
    (where / ".metadata").write_bytes(metadata)
    _debris(where, "data-aaaaaaaaaaaa-0-0.bin")
    report = torchstow.gc(str(tmp_path), older_than=0)
    assert report.removed == [f"{where}/data-aaaaaaaaaaaa-0-0.bin"] and report.skipped == {}
    assert torch.equal(torchstow.read(str(where))["w"], torch.ones(4))
