"""The shared-memory backend with real /dev/shm: checkpoints outlive a writer killed with
SIGKILL, delete frees them, and running out of space commits nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import torchstow
from torchstow import CheckpointNotFoundError, IncompleteCheckpointError, StorageFullError, StorageIOError
from torchstow.backends.shm import SHM_DIR_ENV

from crash_helpers import kill_once_writing


def _run_child(code: str, env: dict[str, str], wait_for: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _expected() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"w": torch.randn(512, 512, generator=gen), "b": torch.randn(512, generator=gen)}


def test_checkpoint_outlives_a_killed_writer_and_a_killed_save_commits_nothing(shm_dir: str) -> None:
    # The child commits step-1, then starts step-2 and is killed with SIGKILL in the middle of it.
    child = _run_child(
        """
        import sys, time, torch, torchstow, torchstow.planning
        gen = torch.Generator().manual_seed(5)
        sd = {"w": torch.randn(512, 512, generator=gen), "b": torch.randn(512, generator=gen)}
        torchstow.save(sd, "shm://run/step-1")

        class Stalls(torchstow.planning.DefaultSavePlanner):
            def resolve_data(self, item):
                if item.index.fqn == "b":
                    print("writing", flush=True)
                    time.sleep(120)
                return super().resolve_data(item)

        torchstow.save({"w": sd["w"] * 2, "b": sd["b"]}, "shm://run/step-2", planner=Stalls())
        """,
        {SHM_DIR_ENV: shm_dir},
    )
    kill_once_writing(child)

    opts = {"shm_dir": shm_dir}
    target = {"w": torch.zeros(512, 512), "b": torch.zeros(512)}
    torchstow.load(target, "shm://run/step-1", storage_options=opts)
    expected = _expected()
    assert torch.equal(target["w"], expected["w"])
    assert torch.equal(target["b"], expected["b"])
    with pytest.raises(IncompleteCheckpointError):  # step-2's data, never committed
        torchstow.load(target, "shm://run/step-2", storage_options=opts)
    assert torchstow.latest("shm://run", storage_options=opts) == "shm://run/step-1"
    torchstow.delete("shm://run/step-2", storage_options=opts, force=True)  # its writer is dead
    assert not os.path.exists(os.path.join(shm_dir, "run", "step-2"))


def _held_files() -> list[str]:
    """What this process's descriptors and memory mappings refer to."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor of the listing itself is gone
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    with open("/proc/self/maps") as maps:
        held += maps.read().splitlines()
    return held


def test_delete_frees_the_memory(shm_dir: str) -> None:
    opts = {"shm_dir": shm_dir}
    torchstow.save({"w": torch.randn(1 << 20)}, "shm://run/step-1", storage_options=opts)
    loaded = torchstow.read("shm://run/step-1", storage_options=opts)
    path = os.path.join(shm_dir, "run", "step-1")
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) >= 4 << 20
    torchstow.delete("shm://run/step-1", storage_options=opts)
    assert not os.path.exists(path)
    # Nothing in this process keeps the deleted files alive (no open descriptor, no mapping).
    assert not [h for h in _held_files() if shm_dir in h]
    assert loaded["w"].numel() == 1 << 20  # what was read stays valid
    with pytest.raises(CheckpointNotFoundError):
        torchstow.read("shm://run/step-1", storage_options=opts)


@pytest.mark.parametrize("scheme", ["shm", "file"])
def test_a_save_larger_than_the_free_space_is_refused_before_writing(
    scheme: str, shm_dir: str, tmp_path: object
) -> None:
    huge = torch.zeros(1, dtype=torch.uint8).expand(1 << 42)  # 4 TiB that occupy one byte of memory
    if scheme == "shm":
        uri, opts, where = "shm://run/huge", {"shm_dir": shm_dir}, shm_dir
    else:
        uri, opts, where = f"{tmp_path}/huge", {}, str(tmp_path)
    with pytest.raises(StorageFullError, match=r"MiB free.*needs 4194304\.\d MiB; nothing was written"):
        torchstow.save({"huge": huge}, uri, storage_options=opts)
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(where) for f in files]
    assert leftovers == []


_TINY_TMPFS_CHILD = """
    import os, sys, torch, torchstow, torchstow.planning
    root = sys.argv[1]
    opts = {"shm_dir": root}
    keep = {"w": torch.ones(256 << 10)}  # 1 MiB
    torchstow.save(keep, "shm://run/step-1", storage_options=opts)

    class AnotherWriterFillsTheSpace(torchstow.planning.DefaultSavePlanner):
        # Between the up-front space check and the write, someone else takes the space.
        def resolve_data(self, item):
            filler = os.path.join(root, "filler")
            if not os.path.exists(filler):
                with open(filler, "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(bytes(1 << 16))
                    except OSError:
                        pass
                os.truncate(filler, os.path.getsize(filler) - (64 << 10))
            return super().resolve_data(item)

    try:
        torchstow.save({"w": torch.ones(512 << 10)}, "shm://run/step-2", storage_options=opts,
                       planner=AnotherWriterFillsTheSpace())
    except torchstow.StorageFullError as exc:
        print("FULL:", " ".join(str(exc).split()))
    files = sorted(os.listdir(os.path.join(root, "run", "step-2")))
    print("LEFT:", files)
    os.remove(os.path.join(root, "filler"))
    got = torchstow.read("shm://run/step-1", storage_options=opts)
    print("STEP1:", bool(torch.equal(got["w"], keep["w"])))
    print("LATEST:", torchstow.latest("shm://run", storage_options=opts))
    torchstow.save({"w": torch.ones(512 << 10)}, "shm://run/step-2", storage_options=opts)
    print("RETRY:", torchstow.latest("shm://run", storage_options=opts))

    # Out of inodes: all taken, then one more free each round, so each save gets one file further.
    fillers = []
    while True:
        try:
            open(os.path.join(root, f"f{len(fillers)}"), "w").close()
        except OSError:
            break
        fillers.append(os.path.join(root, f"f{len(fillers)}"))
    for k in range(6):
        os.remove(fillers[k])
        try:
            torchstow.save({"w": torch.ones(10)}, "shm://inodes/s", storage_options=opts)
            print(f"INODES{k}:", "saved")
        except Exception as e:
            where = os.path.join(root, "inodes", "s")
            held = sorted(os.listdir(where)) if os.path.isdir(where) else []
            full = isinstance(e, torchstow.StorageFullError) and "no space left writing" in str(e)
            print(f"INODES{k}:", type(e).__name__, full, held)
"""


def test_running_out_of_shared_memory_mid_save_commits_nothing(tmp_path: object) -> None:
    """A real 4 MiB tmpfs of 64 inodes (mounted in a private mount namespace) fills up during
    a save; then its inodes run out at each file a save makes: its directory, its data file,
    the chunk table, the temporary manifest and the link to manifest.json (a tmpfs counts
    links as inodes)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a private tmpfs here (no unprivileged user or mount namespaces)")
    mount_point = os.path.join(str(tmp_path), "tiny-shm")
    os.makedirs(mount_point)
    script = os.path.join(str(tmp_path), "child.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(_TINY_TMPFS_CHILD))
    mount_and_run = 'mount -t tmpfs -o size=4m,nr_inodes=64 tmpfs "$1" && exec "$2" "$3" "$1"'
    out = subprocess.run(
        [unshare, "-Urm", "sh", "-c", mount_and_run, "sh", mount_point, sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert "no space left writing" in lines["FULL"]
    assert "nothing was committed" in lines["FULL"]
    assert "shm://" in lines["FULL"] or "tiny-shm" in lines["FULL"]
    assert lines["LEFT"] == "[]"  # the failed save removed its data files
    assert lines["STEP1"] == "True"
    assert lines["LATEST"] == "shm://run/step-1"
    assert lines["RETRY"] == "shm://run/step-2"
    # A plain OSError (ENOSPC) at each of these before: only the data's writes were caught.
    assert [lines[f"INODES{k}"] for k in range(5)] == ["CheckpointException[StorageFullError] True []"] * 5
    assert lines["INODES5"] == "saved"


@pytest.mark.parametrize("kind", ["directory", "link"])
def test_a_per_user_directory_another_user_made_first_is_refused(
    kind: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Anyone may create names in /dev/shm: a directory /dev/shm/torchstow-<uid> made first by
    # someone else (here: owned by this process's real uid, which the backend is told is not
    # its own) would hold this user's checkpoints, readable and replaceable by its owner.
    monkeypatch.delenv(SHM_DIR_ENV, raising=False)
    fake_uid = 2**31 - 7 - os.getpid()
    real_uid = os.getuid()
    base = f"/dev/shm/torchstow-{fake_uid}"
    if kind == "directory":
        os.mkdir(base)
    else:
        os.symlink(str(tmp_path), base)
    monkeypatch.setattr(os, "getuid", lambda: fake_uid)
    try:
        with pytest.raises(StorageIOError, match=f"owned by uid {real_uid}, not by this user"):
            torchstow.save({"w": torch.ones(4)}, "shm://run/step-1")
        with pytest.raises(StorageIOError, match="not by this user"):
            torchstow.list_checkpoints("shm://run")
        assert os.listdir(tmp_path) == []  # nothing written through the link either
        # A directory the caller chose is not checked: a team may share one.
        torchstow.save({"w": torch.ones(4)}, "shm://run/step-1", storage_options={"shm_dir": base})
    finally:
        if kind == "directory":
            shutil.rmtree(base)
        else:
            os.unlink(base)
