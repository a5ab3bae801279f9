"""StateDictStager and DefaultStager: what a staged copy keeps, caching, memory kinds, options."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
from collections import OrderedDict, namedtuple
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from state_helpers import ALL_DTYPES
from torchstow.checkpointing import CheckpointStagerConfig, DefaultStager, StateDictStager
from torchstow.core.staging import stager as staging_module
from torchstow.core.staging.arena import SHM_DIR, SegmentMapper, SharedMemoryArena
from torchstow.core.staging.stager import accelerator_available
from torchstow.testing import assert_same_state

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
no_accelerator = pytest.mark.skipif(
    accelerator_available(), reason="checks the behaviour without an accelerator"
)

Point = namedtuple("Point", "x y")


@dataclass
class Holder:
    weight: torch.Tensor
    name: str
    extra: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class FrozenHolder:
    weight: torch.Tensor
    step: int


@dataclass(frozen=True, slots=True)
class SlottedFrozen:
    weight: torch.Tensor


class Opaque:
    """A non-tensor leaf that is neither a container nor a dataclass."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value


def _shm_files() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"torchstow-{os.getpid()}-")}


# --- StateDictStager ---------------------------------------------------------------------


def test_stage_keeps_containers_and_leaves() -> None:
    w = torch.randn(3, 4)
    sd = {
        "model": OrderedDict(w=w, b=torch.zeros(4)),
        "list": [torch.ones(2), 3, "s"],
        "tuple": (torch.ones(1), None),
        "point": Point(torch.arange(3), 7),
        "holder": Holder(torch.ones(2), "h", [torch.zeros(1)]),
        "frozen": FrozenHolder(torch.full((2,), 5.0), 9),
        "slotted": SlottedFrozen(torch.full((2,), 6.0)),
        "step": 12,
        "lr": 0.5,
        "groups": [{"lr": 0.1, "params": [0, 1]}],
        "opaque": Opaque(4),
        "dtype": torch.float16,
    }
    staged = StateDictStager().stage(sd)

    assert type(staged["model"]) is OrderedDict
    assert list(staged["model"]) == ["w", "b"]
    assert type(staged["tuple"]) is tuple
    assert type(staged["point"]) is Point
    assert staged["point"].y == 7
    assert type(staged["holder"]) is Holder
    assert staged["holder"].name == "h"
    assert type(staged["frozen"]) is FrozenHolder
    assert staged["frozen"].step == 9
    assert type(staged["slotted"]) is SlottedFrozen
    assert staged["step"] == 12
    assert staged["lr"] == 0.5
    assert staged["groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert staged["groups"] is not sd["groups"]  # mutable leaves are copied too
    assert staged["opaque"] == Opaque(4)
    assert staged["dtype"] is torch.float16
    tensors = [
        (staged["model"]["w"], w),
        (staged["list"][0], sd["list"][0]),
        (staged["point"].x, sd["point"].x),
        (staged["holder"].weight, sd["holder"].weight),
        (staged["holder"].extra[0], sd["holder"].extra[0]),
        (staged["frozen"].weight, sd["frozen"].weight),
        (staged["slotted"].weight, sd["slotted"].weight),
    ]
    for copy, original in tensors:
        assert copy is not original
        assert copy.device.type == "cpu"
        assert torch.equal(copy, original)


def test_views_and_shared_storages_stay_shared() -> None:
    base = torch.arange(24.0)
    sd = {
        "base": base,
        "slice": base[4:10],
        "matrix": base.view(4, 6),
        "transposed": base.view(4, 6).t(),
        "strided": base[1::3],
        "other": torch.ones(3),
    }
    staged = StateDictStager().stage(sd)
    pointer = staged["base"].untyped_storage().data_ptr()
    assert pointer != base.untyped_storage().data_ptr()
    for key in ("slice", "matrix", "transposed", "strided"):
        assert staged[key].untyped_storage().data_ptr() == pointer, key
        assert staged[key].storage_offset() == sd[key].storage_offset(), key
        assert staged[key].stride() == sd[key].stride(), key
        assert torch.equal(staged[key], sd[key]), key
    assert staged["other"].untyped_storage().data_ptr() != pointer
    staged["base"][5] = -1.0  # one staged storage: a write shows through every view
    assert staged["slice"][1].item() == -1.0
    assert staged["matrix"][0, 5].item() == -1.0


def test_the_same_tensor_twice_is_one_staged_tensor() -> None:
    t = torch.randn(4)
    staged = StateDictStager().stage({"a": t, "b": [t]})
    assert staged["a"] is staged["b"][0]


def test_staged_copy_is_independent_of_the_original() -> None:
    t = torch.zeros(5)
    sd = {"t": t}
    staged = StateDictStager().stage(sd)
    t.add_(1)
    assert torch.equal(staged["t"], torch.zeros(5))
    staged["t"].sub_(7)
    assert torch.equal(t, torch.ones(5))


def test_staging_again_reuses_buffers_and_shows_new_values() -> None:
    sd = {"a": torch.randn(100), "b": torch.randn(10, 10), "view": None}
    sd["view"] = sd["b"][2]
    stager = StateDictStager()
    first = stager.stage(sd)
    pointers = {k: v.data_ptr() for k, v in first.items()}
    stats = stager.cache_stats()
    assert stats == (2, 100 * 4 + 100 * 4)
    for _ in range(3):
        sd["a"].add_(1)
        sd["b"].mul_(2)
        again = stager.stage(sd)
        assert {k: v.data_ptr() for k, v in again.items()} == pointers
        assert stager.cache_stats() == stats
        for key in sd:
            assert torch.equal(again[key], sd[key])


def test_a_resized_storage_gets_a_new_buffer() -> None:
    t = torch.arange(10.0)
    stager = StateDictStager()
    first_pointer = stager.stage({"t": t})["t"].data_ptr()
    t.resize_(1000)
    t[10:] = 5.0
    staged = stager.stage({"t": t})["t"]
    assert staged.data_ptr() != first_pointer
    assert torch.equal(staged, t)
    assert stager.cache_stats() == (1, 1000 * 4)


def test_cache_entries_go_with_their_source() -> None:
    stager = StateDictStager()
    keep, drop = torch.ones(8), torch.ones(16)
    stager.stage({"keep": keep, "drop": drop})
    assert stager.cache_stats() == (2, 96)
    del drop
    gc.collect()
    assert stager.cache_stats() == (1, 32)


def test_every_dtype_and_empty_and_scalar_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {}
    for dtype in ALL_DTYPES:
        raw = torch.randint(0, 256, (6 * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        sd[str(dtype)] = raw.view(dtype)
        sd[f"{dtype}-empty"] = torch.empty(0, 3, dtype=dtype)
    sd["scalar"] = torch.tensor(3.5)
    assert_same_state(StateDictStager().stage(sd), sd)


def test_tensor_attributes_parameters_and_requires_grad() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    param.sharded = True
    plain = torch.randn(2)
    plain.meta_info = {"origin": "layer1", "mask": torch.ones(2)}
    plain.self_ref = plain
    grad = torch.randn(2, requires_grad=True)
    staged = StateDictStager().stage({"param": param, "plain": plain, "grad": grad})
    assert isinstance(staged["param"], torch.nn.Parameter)
    assert staged["param"].requires_grad
    assert staged["param"].sharded is True
    assert staged["plain"].meta_info["origin"] == "layer1"
    assert torch.equal(staged["plain"].meta_info["mask"], torch.ones(2))
    assert staged["plain"].meta_info["mask"] is not plain.meta_info["mask"]
    assert staged["plain"].self_ref is staged["plain"]
    assert staged["grad"].requires_grad
    assert staged["grad"].grad_fn is None


def test_sparse_and_meta_tensors() -> None:
    sparse = torch.eye(3).to_sparse()
    meta = torch.empty(4, device="meta")
    staged = StateDictStager().stage({"sparse": sparse, "meta": meta})
    assert staged["sparse"].is_sparse
    assert torch.equal(staged["sparse"].to_dense(), torch.eye(3))
    assert staged["meta"].device.type == "meta"
    assert staged["meta"].shape == (4,)


def test_an_object_that_cannot_be_copied_raises() -> None:
    with pytest.raises(TypeError, match="lock"):
        StateDictStager().stage({"lock": threading.Lock()})


@no_accelerator
def test_pinned_memory_without_accelerator_falls_back_and_logs_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging_module, "_no_pinning_logged", False)
    with caplog.at_level(logging.WARNING, logger="torchstow"):
        first = StateDictStager(pin_memory=True)
        second = StateDictStager(pin_memory=True)
    assert not first.pin_memory
    assert not second.pin_memory
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "pageable" in caplog.records[0].message
    staged = first.stage({"t": torch.ones(3)})
    assert not staged["t"].is_pinned()


@pytest.mark.parametrize("pin", [False, True])
@pytest.mark.parametrize("share", [False, True])
def test_state_dict_stager_shares_memory_as_torch_knows_it(pin: bool, share: bool) -> None:
    stager = StateDictStager(pin_memory=pin, share_memory=share)
    w = torch.randn(300, 1024)
    sd = {"w": w, "view": w[1:3], "small": torch.arange(5), "empty": torch.empty(0, 3), "n": [torch.ones(2)]}
    staged = stager.stage(sd)
    tensors = [staged["w"], staged["view"], staged["small"], staged["empty"], staged["n"][0]]
    assert [t.is_shared() for t in tensors] == [share] * len(tensors)
    assert [t.untyped_storage().is_shared() for t in tensors] == [share] * len(tensors)
    storages = [t.untyped_storage().data_ptr() for t in tensors if t.numel()]
    count = stager.cache_stats()
    again = stager.stage(sd)  # reused: the same storages, no new buffer
    assert [again[k].untyped_storage().data_ptr() for k in ("w", "view", "small")] == storages[:3]
    assert stager.cache_stats() == count
    stager.close()
    assert stager.cache_stats() == (0, 0)


def test_shared_memory_is_visible_to_another_mapping() -> None:
    stager = StateDictStager(share_memory=True)
    sd = {"w": torch.randn(1000), "small": torch.arange(5), "empty": torch.empty(0)}
    staged = stager.stage(sd)
    arena = stager.shared_memory
    assert arena is not None
    where = arena.locate(staged["w"].untyped_storage())
    assert where is not None
    assert where.nbytes == 4000
    assert where.segment in _shm_files()
    # Map the segment a second time, as the writer process does: the same pages.
    mapper = SegmentMapper()
    other = torch.empty(0).set_(mapper.storage(where), 0, (1000,), (1,))
    assert torch.equal(other, sd["w"])
    sd["w"].fill_(3.0)
    stager.stage(sd)
    assert torch.equal(other, torch.full((1000,), 3.0))
    assert arena.locate(torch.ones(3).untyped_storage()) is None
    assert arena.locate(staged["empty"].untyped_storage()).nbytes == 0
    mapper.close()
    stager.close()


def test_arena_frees_segments_no_storage_uses() -> None:
    arena = SharedMemoryArena()
    big = arena.allocate(4 << 20)
    small = [arena.allocate(1000) for _ in range(3)]  # a segment each: torch shares each storage
    assert all(storage.is_shared() for storage in [big, *small])
    assert arena.stats()[0] == 4
    assert len(_shm_files()) == 4
    del big
    gc.collect()
    assert arena.stats()[0] == 3
    assert len(arena.take_released()) == 1
    assert len(_shm_files()) == 3
    del small
    arena.close()
    assert not _shm_files()


def test_close_frees_the_cache_and_shared_memory() -> None:
    stager = StateDictStager(share_memory=True)
    staged = stager.stage({"w": torch.randn(100)})
    assert _shm_files()
    stager.close()
    assert stager.cache_stats() == (0, 0)
    assert not _shm_files()
    assert staged["w"].sum().item() == staged["w"].sum().item()  # still readable while referenced
    with pytest.raises(RuntimeError, match="closed"):
        stager.stage({"w": torch.randn(100)})


# --- DefaultStager -----------------------------------------------------------------------


@no_accelerator
def test_non_blocking_copy_without_accelerator_raises_at_construction() -> None:
    with pytest.raises(ValueError, match="use_non_blocking_copy=True needs an accelerator"):
        DefaultStager(CheckpointStagerConfig(use_non_blocking_copy=True))


def test_default_config_works_everywhere() -> None:
    sd = {"w": torch.randn(10), "n": 1}
    with DefaultStager() as stager:
        future = stager.stage(sd)
        assert isinstance(future, Future)
        staged = future.result()
    assert torch.equal(staged["w"], sd["w"])
    assert staged["n"] == 1


OPTIONS = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize(("pinned", "shared", "background", "non_blocking"), OPTIONS)
def test_every_option_combination(pinned: bool, shared: bool, background: bool, non_blocking: bool) -> None:
    config = CheckpointStagerConfig(
        use_pinned_memory=pinned,
        use_shared_memory=shared,
        use_async_staging=background,
        use_non_blocking_copy=non_blocking,
    )
    if non_blocking and not accelerator_available():
        with pytest.raises(ValueError, match="needs an accelerator"):
            DefaultStager(config)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(64, 64, device=device)
    sd = {"w": w, "row": w[3], "b": torch.arange(8, device=device), "empty": torch.empty(0), "step": 3}
    stager = DefaultStager(config)
    result = stager.stage(sd)
    assert isinstance(result, Future) == background
    staged = result.result() if background else result
    assert staged["step"] == 3
    for key in ("w", "row", "b", "empty"):
        assert staged[key].device.type == "cpu"
        assert torch.equal(staged[key], sd[key].cpu())
        assert staged[key].is_pinned() == (pinned and torch.cuda.is_available() and key != "empty")
        # Shared memory as torch knows it: torch.multiprocessing hands these on without a copy.
        assert staged[key].is_shared() == shared
        assert staged[key].untyped_storage().is_shared() == shared
    pointers = {key: staged[key].untyped_storage().data_ptr() for key in ("w", "b")}
    again = stager.stage(sd)
    again = again.result() if background else again
    for key in ("w", "b"):  # staged again into the same storages, still shared
        assert again[key].untyped_storage().data_ptr() == pointers[key]
        assert again[key].is_shared() == shared
    arena = stager.state_dict_stager.shared_memory
    assert (arena is not None) == shared
    if arena is not None:
        assert arena.locate(staged["w"].untyped_storage()) is not None
    stager.close()


def test_close_releases_the_thread_and_memory() -> None:
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=True, use_shared_memory=True))
    sd = {"w": torch.randn(100)}
    stager.stage(sd).result()
    assert any(t.name.startswith("torchstow-staging") for t in threading.enumerate())
    assert stager.cache_stats()[0] == 1
    stager.close()
    assert not any(t.name.startswith("torchstow-staging") for t in threading.enumerate())
    assert stager.cache_stats() == (0, 0)
    assert not _shm_files()
    with pytest.raises(RuntimeError, match="closed"):
        stager.stage({"w": torch.randn(100)})


def test_background_staging_error_surfaces_on_the_future() -> None:
    with DefaultStager(CheckpointStagerConfig(use_async_staging=True)) as stager:
        future = stager.stage({"lock": threading.Lock()})
        with pytest.raises(TypeError):
            future.result()
        assert torch.equal(stager.stage({"w": torch.ones(2)}).result()["w"], torch.ones(2))


# --- CUDA --------------------------------------------------------------------------------


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("background", [False, True])
def test_cuda_staging_is_pinned_and_non_blocking(shared: bool, background: bool) -> None:
    config = CheckpointStagerConfig(use_shared_memory=shared, use_async_staging=background)
    sd = {"w": torch.randn(1024, 1024, device="cuda"), "v": None}
    sd["v"] = sd["w"][3]
    stager = DefaultStager(config)  # defaults: pinned, non-blocking on a side stream
    result = stager.stage(sd)
    staged = result.result() if background else result
    assert staged["w"].is_pinned()
    assert staged["v"].untyped_storage().data_ptr() == staged["w"].untyped_storage().data_ptr()
    assert torch.equal(staged["w"], sd["w"].cpu())
    pointer = staged["w"].data_ptr()
    sd["w"].add_(1)
    again = stager.stage(sd)
    again = again.result() if background else again
    assert again["w"].data_ptr() == pointer
    assert torch.equal(again["w"], sd["w"].cpu())
    stager.close()


@pytest.mark.cuda
@cuda_only
def test_cuda_side_stream_waits_for_queued_work() -> None:
    """A kernel still queued on the current stream when stage() is called must
    land in the staged copy: the side stream waits for it."""
    source = torch.zeros(4096, 4096, device="cuda")
    stager = DefaultStager(CheckpointStagerConfig(use_async_staging=True))
    torch.cuda._sleep(200_000_000)  # keep the current stream busy
    source.fill_(7.0)  # queued behind the sleep
    staged = stager.stage({"s": source}).result()
    assert torch.equal(staged["s"], torch.full((4096, 4096), 7.0))
    stager.close()


@pytest.mark.cuda
@cuda_only
def test_cuda_and_cpu_tensors_in_one_state_dict() -> None:
    sd = {"gpu": torch.randn(100, device="cuda"), "cpu": torch.randn(100)}
    with DefaultStager(CheckpointStagerConfig(use_async_staging=False)) as stager:
        staged = stager.stage(sd)
        assert torch.equal(staged["gpu"], sd["gpu"].cpu())
        assert torch.equal(staged["cpu"], sd["cpu"])
