"""A manifest that claims a 1 TiB tensor whose data file was deleted: every way of reading it
refuses with CorruptCheckpointError before allocating anything, under an address-space limit
(without the guard each path asks the allocator for 1 TiB)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tamper import tamper

import torchstow

NUMEL = 1 << 38  # float32: 1 TiB

CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    import torchstow
    from torchstow.checkpointing import CheckpointReader, RankInfo
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    paths = {
        "read": lambda: torchstow.read(path),
        "read keys": lambda: torchstow.read(path, keys=["w"]),
        "read mmap": lambda: torchstow.read(path, mmap=True),
        "load into meta": lambda: torchstow.load({"w": torch.empty(NUMEL, device="meta")}, path),
        "CheckpointReader whole": lambda: CheckpointReader(RankInfo()).read(path),
        "CheckpointReader placeholder": lambda: CheckpointReader(RankInfo()).read(path, {"w": None}),
        "convert": lambda: torchstow.convert(path, out, to="torch"),
    }
    for name in names:
        try:
            paths[name]()
        except torchstow.CorruptCheckpointError as exc:
            outcome = "REFUSED" if "is missing" in str(exc) else f"OTHER {exc}"
        except BaseException as exc:
            outcome = f"OTHER {type(exc).__name__}: {str(exc)[:200]}"
        else:
            outcome = "READ"
        print(f"{name}: " + outcome.replace("\\n", " "))
    """
).replace("NUMEL", str(NUMEL))


ALL = [
    "read",
    "read keys",
    "read mmap",
    "load into meta",
    "CheckpointReader whole",
    "CheckpointReader placeholder",
    "convert",
]


def _outcomes(path: str, tmp_path: Any, names: list[str]) -> dict[str, str]:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to size the address-space limit")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, path, str(tmp_path / "out.pt"), *names],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines())


@pytest.mark.slow
def test_a_1_tib_claim_in_a_deleted_file_is_refused_before_allocating(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    torchstow.save({"w": torch.arange(12.0), "n": 3}, path, format_version=1)

    def claim(doc: dict[str, Any]) -> None:
        block = doc["checksum"]["block_size"]
        doc["entries"]["w"].update(shape=[NUMEL], length=NUMEL * 4, crc32c=[0] * -(-(NUMEL * 4) // block))
        for name in doc["files"]:
            os.remove(os.path.join(path, name))

    tamper(path, claim)
    assert _outcomes(path, tmp_path, ALL) == dict.fromkeys(ALL, "REFUSED")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_a_1_tib_claim_in_a_stock_dcp_checkpoint_without_its_distcp_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "stock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(12.0), "n": 3}, checkpoint_id=path)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # written just now by dcp.save
    entry = metadata.state_dict_metadata["w"]
    entry.size = torch.Size([NUMEL])
    entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=torch.Size([NUMEL]))
    for index, info in metadata.storage_data.items():  # and a blob that could hold it
        if index.fqn == "w":
            metadata.storage_data[index] = dataclasses.replace(info, length=NUMEL * 4 + 4096)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            os.remove(os.path.join(path, name))
    # (CheckpointReader reads torchstow's format only.)
    names = ["read", "read keys", "convert"]
    assert _outcomes(path, tmp_path, names) == dict.fromkeys(names, "REFUSED")
