"""Two real processes saving to one name at once, on local files, shm:// and S3 (moto):
without overwrite exactly one commits and the other gets CheckpointExistsError; with
overwrite the last to commit wins; either way the checkpoint loads bit-exact, whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

import torchstow

from storage_helpers import s3_options, unique

SAVER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, torchstow, torchstow.planning

    class Slow(torchstow.planning.DefaultSavePlanner):
        # Holds the save between its existence check and its commit, so the two saves overlap.
        def resolve_data(self, item):
            time.sleep(0.3)
            return super().resolve_data(item)

    value, go, rounds = float(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    print("READY", flush=True)
    for n, (uri, overwrite, opts) in enumerate(rounds):
        while not os.path.exists(f"{go}-{n}"):
            time.sleep(0.002)
        state = {"a": torch.full((1024,), value), "b": torch.full((70_000,), value, dtype=torch.float64)}
        try:
            torchstow.save(state, uri, overwrite=overwrite, storage_options=opts, planner=Slow())
            print("COMMITTED", flush=True)
        except torchstow.CheckpointExistsError:
            print("EXISTS", flush=True)
    """
)


def expected(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((1024,), value), "b": torch.full((70_000,), value, dtype=torch.float64)}


def race(tmp_path: Any, rounds: list[tuple[str, bool, dict[str, Any]]]) -> list[list[str]]:
    """Start two savers (values 1.0 and 2.0), release them together for each round,
    and return each round's outcomes in saver order."""
    go = str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, str(value), go, json.dumps(rounds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for value in (1.0, 2.0)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        outcomes = []
        for n in range(len(rounds)):
            open(f"{go}-{n}", "w").close()
            outcomes.append([proc.stdout.readline().strip() for proc in procs if proc.stdout is not None])
        for proc in procs:
            assert proc.wait(timeout=120) == 0
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def assert_whole(uri: str, opts: dict[str, Any], allowed: tuple[float, ...]) -> float:
    got = torchstow.read(uri, storage_options=opts)
    value = float(got["a"][0])
    assert value in allowed
    want = expected(value)
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"]), "a mix of two saves"
    return value


def check(exclusive: list[str], overwriting: list[str], new: str, existing: str, opts: Any) -> None:
    assert sorted(exclusive) == ["COMMITTED", "EXISTS"], exclusive
    winner = assert_whole(new, opts, (1.0, 2.0))
    assert winner == (1.0, 2.0)[exclusive.index("COMMITTED")]
    assert overwriting == ["COMMITTED", "COMMITTED"]
    assert_whole(existing, opts, (1.0, 2.0))


@pytest.mark.slow
def test_two_processes_race_on_local_files_shm_and_s3(
    tmp_path: Any, s3_endpoint: str, s3_bucket: str, shm_dir: str
) -> None:
    local = {"new": str(tmp_path / "new"), "existing": str(tmp_path / "existing")}
    base = f"s3://{s3_bucket}/{unique('race')}"
    remote = {"new": f"{base}/new", "existing": f"{base}/existing"}
    memory = {"new": "shm://race/new", "existing": "shm://race/existing"}
    s3 = s3_options(s3_endpoint)
    shm = {"shm_dir": shm_dir}
    torchstow.save(expected(0.0), local["existing"])
    torchstow.save(expected(0.0), remote["existing"], storage_options=s3)
    torchstow.save(expected(0.0), memory["existing"], storage_options=shm)
    replaced = set(os.listdir(local["existing"])) - {"manifest.json"}
    outcomes = race(
        tmp_path,
        [
            (local["new"], False, {}),
            (local["existing"], True, {}),
            (remote["new"], False, s3),
            (remote["existing"], True, s3),
            (memory["new"], False, shm),
            (memory["existing"], True, shm),
        ],
    )
    check(outcomes[4], outcomes[5], memory["new"], memory["existing"], shm)
    check(outcomes[0], outcomes[1], local["new"], local["existing"], {})
    check(outcomes[2], outcomes[3], remote["new"], remote["existing"], s3)
    with open(os.path.join(local["new"], "manifest.json")) as f:
        manifest = json.load(f)
    # The loser removed its own files and only those: what remains is exactly the winner's.
    assert sorted(f for f in os.listdir(local["new"]) if f.endswith(".bin")) == sorted(manifest["files"])
    assert not [f for f in os.listdir(local["new"]) if f.startswith(".")]
    # Both overwrites removed the checkpoint they replaced; the winner's files are whole (above).
    assert replaced and not replaced & set(os.listdir(local["existing"]))
