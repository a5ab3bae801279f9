"""Compressed checkpoints reshard: saved by 2 gloo ranks with compression="zstd", loaded
bit-exact by 3 ranks (uneven shards) and by 2 ranks sharded along the other dimension (every
rank needs part of every stored chunk), and read whole in one process."""

from __future__ import annotations

from typing import Any

import pytest
from compression_scenarios import SHAPES, full, load_compressed, save_compressed

import torchstow
from torchstow.testing.compare import assert_same_state

SEED = 4


@pytest.fixture(scope="module")
def saved(pools: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("compressed") / "ws2-S0")
    pools(2).run(save_compressed, path, ("S0",), SEED)
    return path


def test_every_stored_chunk_is_compressed(saved: str) -> None:
    metadata = torchstow.storage_reader(saved).read_metadata()
    codecs = {(i.fqn, tuple(i.offset)): info.codec for i, info in metadata.storage_data.items()}
    assert len(codecs) == 2 * len(SHAPES)  # one chunk per rank and tensor
    assert all(codec is not None for codec in codecs.values()), codecs
    assert {codec for (name, _), codec in codecs.items() if name != "ints"} == {"byteplanes-zstd"}, codecs


@pytest.mark.parametrize(
    ("world_size", "layout"), [(3, ("S0",)), (2, ("S1",))], ids=["3-ranks", "2-ranks-S1"]
)
def test_loads_bit_exact_on_another_layout(
    pools: Any, saved: str, world_size: int, layout: tuple[str, ...]
) -> None:
    results = pools(world_size).run(load_compressed, saved, layout, SEED)
    assert [r["mismatches"] for r in results] == [[]] * world_size


def test_reads_whole_in_one_process(saved: str) -> None:
    expected: dict[str, Any] = {"step": SEED, **{name: full(name, SEED) for name in SHAPES}}
    assert_same_state(torchstow.read(saved), expected)
