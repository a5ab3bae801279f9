"""A DCP-format checkpoint from someone else: its .metadata is held to the same rules as a
torchstow manifest - plain file names, sane shapes, chunks that tile, locations inside files."""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def stock(tmp_path: Path) -> str:
    path = str(tmp_path / "step-1")
    dcp.save({"w": torch.arange(12.0).reshape(4, 3), "step": 1}, checkpoint_id=path, no_dist=True)
    return path


def rewrite(path: str, change: Callable[[Any], None]) -> None:
    with open(os.path.join(path, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # the test's own file: trusted here
    change(metadata)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def location_of(metadata: Any, fqn: str) -> tuple[Any, Any]:
    return next((index, info) for index, info in metadata.storage_data.items() if index.fqn == fqn)


def set_info(metadata: Any, fqn: str, **changes: Any) -> None:
    index, info = location_of(metadata, fqn)
    metadata.storage_data[index] = dataclasses.replace(info, **changes)


def assert_refused(path: str, *patterns: str) -> None:
    for call in (
        lambda: torchstow.read(path),
        lambda: torchstow.load({"w": torch.zeros(4, 3), "step": 0}, path),
    ):
        with pytest.raises(torchstow.CorruptCheckpointError) as info:
            call()
        for pattern in patterns:
            assert pattern in str(info.value), str(info.value)


def test_the_stock_checkpoint_reads(stock: str) -> None:
    assert torch.equal(torchstow.read(stock)["w"], torch.arange(12.0).reshape(4, 3))


@pytest.mark.parametrize("name", ["..", "../secret.distcp", "/etc/passwd", ""])
def test_a_file_name_outside_the_checkpoint(stock: str, name: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", relative_path=name))
    assert_refused(stock, "'w'", "not a plain file name")


def test_a_claim_larger_than_the_file_is_refused_before_allocating(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", length=20 * 10**9))
    assert_refused(stock, "'w'", "truncated or the manifest is wrong")


def test_a_chunk_in_fewer_bytes_than_its_elements(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", length=8))
    assert_refused(stock, "'w'", "cannot hold a chunk")


def test_a_negative_offset(stock: str) -> None:
    rewrite(stock, lambda md: set_info(md, "w", offset=-10))
    assert_refused(stock, "'w'", "offset is -10")


@pytest.mark.parametrize("offset", [float("inf"), 1.5])
def test_an_offset_that_is_no_integer(stock: str, offset: float) -> None:
    rewrite(stock, lambda md: set_info(md, "w", offset=offset))  # inf was an OverflowError
    assert_refused(stock, "'w'", "float offset")


def test_metadata_without_its_entries(stock: str) -> None:
    """An object the pickle built without the field (its name damaged): was an AttributeError."""
    rewrite(stock, lambda md: delattr(md, "state_dict_metadata"))
    assert_refused(stock, "does not hold DCP Metadata")
    with pytest.raises(torchstow.CorruptCheckpointError, match="does not hold DCP Metadata"):
        torchstow.info(stock)


def test_a_key_nested_five_thousand_deep(stock: str) -> None:
    """Rebuilding it recursed past Python's limit (RecursionError), and making each prefix
    of a long path took memory quadratic in its length."""
    rewrite(stock, lambda md: md.planner_data.update(w=("m",) * 5000 + ("w",)))
    assert_refused(stock, "'w' has 5001 parts, more than 100")


def test_a_negative_and_a_huge_shape(stock: str) -> None:
    def shape(size: list[int]) -> Callable[[Any], None]:
        def change(md: Any) -> None:
            entry = md.state_dict_metadata["w"]
            entry.size = torch.Size(size)
            entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=torch.Size(size))

        return change

    rewrite(stock, shape([-4, 3]))
    assert_refused(stock, "'w'", "outside 0..")
    rewrite(stock, shape([10**6, 10**6]))
    assert_refused(stock, "'w'", "cannot hold a chunk")


def test_chunks_with_a_gap(stock: str) -> None:
    def gap(md: Any) -> None:
        entry = md.state_dict_metadata["w"]
        entry.chunks[0] = dataclasses.replace(entry.chunks[0], sizes=torch.Size([3, 3]))

    rewrite(stock, gap)
    assert_refused(stock, "'w'", "cover 9 elements of the 12")


def tuple_tower(levels: int) -> bytes:
    """Pickle ops leaving one tuple on the stack: level i is (level i-1, level i-1), each
    level memoized once and fetched twice, so hashing it visits 2**levels tuples."""
    ops = b")q\x00"  # an empty tuple, memo 0
    for level in range(1, levels + 1):  # (top of the stack, memo level-1 again): a pair, memoized
        ops += b"h" + bytes([level - 1]) + b"\x86q" + bytes([level])
    return ops


HOSTILE_METADATA = {
    # {tower: 0}: hashing the key as the dict is built
    "dict-key": b"\x80\x02}" + tuple_tower(48) + b"K\x00s.",
    # within any nesting limit, 2**31 visits all the same
    "dict-key-shallow": b"\x80\x02}" + tuple_tower(31) + b"K\x00s.",
    # DCP's memory-format enum looked up by the tower: hashing it in the enum's value map
    "enum-value": b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
    + tuple_tower(48)
    + b"\x85R.",
}

CHILD = """
import json, logging, sys, time
import torchstow
logging.disable(logging.WARNING)
run, bad = sys.argv[1], sys.argv[2]
out = {}
for name, call in [("info", lambda: torchstow.info(bad)), ("read", lambda: torchstow.read(bad)),
                   ("ls", lambda: [c.uri for c in torchstow.list_checkpoints(run)]),
                   ("latest", lambda: torchstow.latest(run))]:
    start = time.monotonic()
    try:
        result = call()
    except torchstow.CorruptCheckpointError as exc:
        result = "refused: " + str(exc)
    out[name] = [time.monotonic() - start, result if isinstance(result, (str, list)) else repr(result)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", sorted(HOSTILE_METADATA))
def test_metadata_whose_hashing_explodes_fails_fast(tmp_path: Path, name: str) -> None:
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    good = str(run / "step-1")
    dcp.save({"w": torch.ones(2)}, checkpoint_id=good, no_dist=True)
    bad = run / "step-2"
    bad.mkdir()
    (bad / ".metadata").write_bytes(HOSTILE_METADATA[name])
    assert len(HOSTILE_METADATA[name]) < 400
    done = subprocess.run(  # a hang in C ignores signals: only a separate process can be stopped
        [sys.executable, "-c", CHILD, str(run), str(bad)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for call in ("info", "read"):
        seconds, result = out[call]
        assert result.startswith("refused: ") and ".metadata" in result, (call, result)
        assert seconds < 5, (call, seconds)
    assert out["ls"][1] == [good] and out["ls"][0] < 5
    assert out["latest"][1] == good and out["latest"][0] < 5


@pytest.mark.parametrize(
    ("mappings", "pattern"),
    [
        ({"w": ("x",), "step": ("x",)}, "recorded at the same place"),
        ({"w": ("a", "b"), "step": ("a",)}, "recorded where a container is"),
        ({"w": ("a", 0.5), "step": ("step",)}, "not a sequence of keys and indices"),
        ({"w": "w", "step": ("step",)}, "not a sequence of keys and indices"),
        ({"w": (("w",), ("w",)), "step": ("step",)}, "not a sequence of keys and indices"),
    ],
)
def test_planner_data_that_drops_or_misplaces_a_key_is_refused(
    stock: str, tmp_path: Path, mappings: dict[str, Any], pattern: str
) -> None:
    def change(md: Any) -> None:
        md.planner_data = mappings

    rewrite(stock, change)
    with pytest.raises(torchstow.CorruptCheckpointError, match=pattern):
        torchstow.read(stock)
    with pytest.raises(torchstow.CorruptCheckpointError, match=pattern):
        torchstow.convert(stock, tmp_path / "out.pt", to="torch")
    assert not (tmp_path / "out.pt").exists()
