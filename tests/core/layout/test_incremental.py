"""save(sd, uri, base=previous): only changed tensors are written (BLAKE3 equality), the
rest is shared with the base; every checkpoint loads on its own after its base is
deleted, survives a kill -9 of a later save, and reports what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from manifest_json import manifest_doc
from torchstow.format.files import is_chunk_table
from torchstow.testing import assert_same_state

from crash_helpers import kill_once_writing


def _state(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "frozen": {f"w{i}": torch.randn(256, 1024, generator=gen) for i in range(4)},  # 4 x 1 MiB
        "trainable": torch.randn(64, 64, generator=gen),
        "step": 1,
        "betas": (0.9, 0.999),  # an object written as bytes every time
    }


def _train(state: dict[str, Any], step: int) -> dict[str, Any]:
    """The next step's state: only the trainable tensor and the step change."""
    return {**state, "trainable": state["trainable"] + step, "step": step}


def _entries(path: str) -> dict[str, Any]:
    return dict(manifest_doc(path)["entries"])


def test_only_changed_tensors_are_written_and_each_checkpoint_stands_alone(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"step-{i}") for i in range(1, 4)]
    states = [_state()]
    torchstow.save(states[0], paths[0])
    full = torchstow.info(paths[0])
    assert full.nbytes_written == full.nbytes
    for i in (1, 2):
        states.append(_train(states[-1], i + 1))
        torchstow.save(states[-1], paths[i], base=paths[i - 1])
        written = torchstow.info(paths[i])
        assert written.nbytes == full.nbytes
        # the trainable tensor and the pickled object, nothing of the 4 MiB frozen
        assert 64 * 64 * 4 <= written.nbytes_written < 64 * 64 * 4 + 4096
        entries = _entries(paths[i])
        assert all(len(entries[f"frozen.w{k}"]["blake3"]) == 64 for k in range(4))
        assert entries["trainable"]["blake3"] != _entries(paths[0])["trainable"].get("blake3")
    frozen_file = _entries(paths[2])["frozen.w0"]["file"]
    files = manifest_doc(paths[2])["files"]
    assert os.path.samefile(Path(paths[0], files[frozen_file]), Path(paths[2], files[frozen_file]))
    torchstow.delete(paths[0])
    torchstow.delete(paths[1])
    assert not os.path.exists(paths[0])
    assert_same_state(torchstow.read(paths[2]), states[2])
    target = _state(seed=9)
    torchstow.load(target, paths[2])
    assert_same_state(target, states[2])


def test_changed_and_new_tensors_are_written_and_a_plain_base_is_hashed_from_its_files(
    tmp_path: Path,
) -> None:
    base, nxt = str(tmp_path / "a"), str(tmp_path / "b")
    state = _state()
    torchstow.save(state, base)  # a plain save: no digests recorded
    frozen = state["frozen"]
    changed = {**state, "frozen": {**frozen, "w2": frozen["w2"].reshape(512, 512), "w3": frozen["w3"] * 2}}
    changed["extra"] = torch.ones(1024)
    torchstow.save(changed, nxt, base=base)
    written = torchstow.info(nxt).nbytes_written
    # w3 (new values) and extra are written; w2, reshaped but with the same bytes, is shared
    assert (1 << 20) + 4096 <= written < (1 << 20) + 4096 + 4096
    assert_same_state(torchstow.read(nxt), changed)


def test_saving_over_the_base_itself_keeps_what_it_shares(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    state = _state()
    torchstow.save(state, path)
    later = _train(state, 2)
    torchstow.save(later, path, base=path, overwrite=True)
    assert torchstow.info(path).nbytes_written < 64 * 64 * 4 + 4096
    assert_same_state(torchstow.read(path), later)


def test_a_store_that_cannot_share_files_refuses_base(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    torchstow.save({"x": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="incremental saves need a file-like backend"):
        torchstow.save({"x": torch.ones(2)}, str(tmp_path / "next"), base=f"faulty+file://{path}")


def test_async_incremental_saves_commit_and_load(tmp_path: Path) -> None:
    first, second = str(tmp_path / "s1"), str(tmp_path / "s2")
    state = _state()
    torchstow.async_save(state, first).result()
    later = _train(state, 2)
    torchstow.async_save(later, second, base=first).result()
    assert torchstow.info(second).nbytes_written < 64 * 64 * 4 + 4096
    torchstow.delete(first)
    assert_same_state(torchstow.read(second), later)


def test_a_save_killed_mid_write_commits_nothing_and_its_base_stays_whole(tmp_path: Path) -> None:
    base, nxt = str(tmp_path / "step-1"), str(tmp_path / "step-2")
    state = _state()
    torchstow.save(state, base)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time, torch, torchstow, torchstow.planning
                gen = torch.Generator().manual_seed(0)
                sd = {{"frozen": {{f"w{{i}}": torch.randn(256, 1024, generator=gen) for i in range(4)}},
                      "trainable": torch.randn(64, 64, generator=gen) + 5, "step": 5, "betas": (0.9, 0.999)}}

                class Stalls(torchstow.planning.DefaultSavePlanner):
                    def resolve_data(self, item):
                        if item.index.fqn == "trainable":
                            print("writing", flush=True)
                            time.sleep(120)
                        return super().resolve_data(item)

                torchstow.save(sd, {nxt!r}, base={base!r}, planner=Stalls())
                """
            ),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_once_writing(child)
    with pytest.raises(torchstow.IncompleteCheckpointError):
        torchstow.read(nxt)
    assert torchstow.latest(str(tmp_path)) == base
    torchstow.delete(nxt, force=True)  # its saver is dead; removes its names only
    assert_same_state(torchstow.read(base), state)


def test_prune_keeps_shared_bytes_and_verify_checks_them(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"step-{i}") for i in range(1, 4)]
    state = _state()
    torchstow.save(state, paths[0])
    for i in (1, 2):
        state = _train(state, i + 1)
        torchstow.save(state, paths[i], base=paths[i - 1])
    assert torchstow.prune(str(tmp_path), keep_last=1) == paths[:2]
    report = torchstow.verify(paths[2])
    assert report.ok
    assert report.checked_bytes >= torchstow.info(paths[2]).nbytes  # the shared files are read too
    assert_same_state(torchstow.read(paths[2]), state)
    # A flipped byte in a file step-3 shares with the pruned step-1 is found by verify.
    manifest = manifest_doc(paths[2])
    entry = manifest["entries"]["frozen.w1"]
    shared = Path(paths[2], manifest["files"][entry["file"]])
    data = bytearray(shared.read_bytes())
    data[entry["offset"] + 7] ^= 0x01
    shared.write_bytes(bytes(data))
    problems = torchstow.verify(paths[2]).problems
    assert [p.key for p in problems] == ["frozen.w1"]


@pytest.mark.parametrize("damage", ["truncated", "symlink"])
def test_a_damaged_base_file_is_written_again_not_linked(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [str(tmp_path / f"step-{i}") for i in range(1, 4)]
    state = _state()
    torchstow.save(state, paths[0])
    state = _train(state, 2)
    torchstow.save(state, paths[1], base=paths[0])  # records every item's digest
    manifest = manifest_doc(paths[1])
    damaged = manifest["entries"]["frozen.w0"]["file"]
    shared = Path(paths[1], manifest["files"][damaged])
    held = [e for e in manifest["entries"].values() if e.get("file") == damaged]
    if damage == "truncated":  # by the last byte the base uses of it
        os.truncate(shared, max(e["offset"] + e["length"] for e in held) - 1)
    else:  # the same bytes, through a symbolic link
        copy = tmp_path / "elsewhere.bin"
        copy.write_bytes(shared.read_bytes())
        shared.unlink()
        shared.symlink_to(copy)
    state = _train(state, 3)
    with caplog.at_level("WARNING", logger="torchstow"):
        torchstow.save(state, paths[2], base=paths[1])
    assert_same_state(torchstow.read(paths[2]), state)
    assert torchstow.verify(paths[2]).ok
    assert not any(p.is_symlink() for p in Path(paths[2]).iterdir())
    rewritten = sum(e["length"] for e in held) + 64 * 64 * 4  # the damaged file's items, and the trainable
    assert torchstow.info(paths[2]).nbytes_written >= rewritten
    assert "written again instead of shared" in caplog.text


def test_a_save_that_shares_everything_leaves_no_unlisted_data_file(tmp_path: Path) -> None:
    base, nxt = tmp_path / "step-1", tmp_path / "step-2"
    state = {"frozen": torch.randn(256, 1024), "other": torch.randn(64), "step": 1}
    torchstow.save(state, str(base))
    torchstow.save(state, str(nxt), base=str(base), storage_options={"thread_count": 2})
    assert torchstow.info(str(nxt)).nbytes_written == 0
    listed = set(manifest_doc(nxt)["files"])
    assert {p.name for p in nxt.iterdir() if not is_chunk_table(p.name)} == listed | {"manifest.json"}
    assert_same_state(torchstow.read(str(nxt)), state)
