"""Single-process save/load round trips on the local filesystem."""

from __future__ import annotations

import collections
import copy
import os
from typing import Any

import pytest
import torch

import torchstow
import torchstow.planning
from state_helpers import ALL_DTYPES
from torchstow.testing import assert_same_state


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (NaNs and odd patterns included)."""
    n = torch.empty(shape, dtype=dtype).nbytes
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def trained_model_state() -> tuple[dict[str, Any], torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 32),
        torch.nn.BatchNorm1d(7),
        torch.nn.Linear(32, 4),
    )
    optim = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    for step in range(3):
        out = model(torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(step)))
        out.square().mean().backward()
        optim.step()
        optim.zero_grad()
    return {"model": model.state_dict(), "optim": optim.state_dict(), "step": 3}, model, optim


def test_model_and_optimizer_round_trip_bit_exact(ckpt: str) -> None:
    state, model, optim = trained_model_state()
    torchstow.save(state, ckpt)

    torch.manual_seed(1)
    fresh_state, fresh_model, fresh_optim = trained_model_state()
    with torch.no_grad():
        for p in fresh_model.parameters():
            p.add_(1.0)
    fresh_state = {"model": fresh_model.state_dict(), "optim": fresh_optim.state_dict(), "step": 0}
    torchstow.load(fresh_state, ckpt)
    fresh_model.load_state_dict(fresh_state["model"])
    fresh_optim.load_state_dict(fresh_state["optim"])

    assert_same_state(model.state_dict(), fresh_model.state_dict())
    assert_same_state(optim.state_dict(), fresh_optim.state_dict())
    assert fresh_state["step"] == 3
    # The optimizer keeps working from the loaded state, identically.
    for m, o in ((model, optim), (fresh_model, fresh_optim)):
        m(torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(9))).sum().backward()
        o.step()
    assert_same_state(model.state_dict(), fresh_model.state_dict())


def test_loaded_tensors_are_filled_in_place(ckpt: str) -> None:
    state = {"w": torch.arange(12.0).reshape(3, 4)}
    torchstow.save(state, ckpt)
    target = torch.zeros(3, 4)
    holder = {"w": target}
    torchstow.load(holder, ckpt)
    assert holder["w"] is target
    assert torch.equal(target, state["w"])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(ckpt: str, dtype: torch.dtype) -> None:
    state = {"x": random_bits((5, 3), dtype, seed=1), "scalar": random_bits((), dtype, seed=2)}
    torchstow.save(state, ckpt)
    target = {"x": torch.zeros(5, 3, dtype=dtype), "scalar": torch.zeros((), dtype=dtype)}
    torchstow.load(target, ckpt)
    assert_same_state(state, target)
    assert_same_state(state, torchstow.read(ckpt))


def test_nested_containers_round_trip(ckpt: str) -> None:
    Pair = collections.namedtuple("Pair", "left right")
    state = {
        "a": {"b": {"c": torch.ones(2)}, "empty": {}},
        "seq": [torch.zeros(1), {"inner": torch.full((2,), 3.0)}, (torch.ones(1), 7)],
        "tup": (torch.arange(3), "label"),
        "pair": Pair(torch.ones(2), torch.zeros(2)),
        "ints": {0: torch.ones(1), 1: {"step": 5}},
        "weird.key": torch.ones(1),
    }
    torchstow.save(state, ckpt)
    target = copy.deepcopy(state)
    for t in (target["a"]["b"]["c"], target["seq"][0], target["tup"][0], target["weird.key"]):
        t.zero_()
    target["seq"][2][0].zero_()
    target["ints"][1]["step"] = 0
    target["tup"] = (target["tup"][0], "other")
    torchstow.load(target, ckpt)
    assert_same_state(state, target)

    materialized = torchstow.read(ckpt)
    assert materialized["a"]["empty"] == {}
    assert isinstance(materialized["tup"], tuple)
    assert isinstance(materialized["seq"], list)
    assert list(materialized["ints"]) == [0, 1]
    assert materialized["ints"][1]["step"] == 5
    assert torch.equal(materialized["weird.key"], torch.ones(1))
    assert torch.equal(materialized["pair"][0], torch.ones(2))  # a namedtuple comes back as a tuple


def test_non_tensor_leaves_round_trip(ckpt: str) -> None:
    state = {
        "int": 7,
        "big": 2**70,
        "float": 0.1,
        "neg_zero": -0.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "str": "héllo",
        "none": None,
        "bool": True,
        "list": [1, 2.5, "x", None, [True]],
        "dict_of_json": {"lr": 0.1, "betas": [0.9, 0.99]},
        "tuple_leaf": (0.9, 0.999),
        "set": {1, 2, 3},
        "bytes": b"\x00\x01",
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "sparse": torch.eye(3).to_sparse(),
    }
    torchstow.save(state, ckpt)
    back = torchstow.read(ckpt)
    nan = back.pop("nan")
    assert nan != nan  # NaN survives (not as JSON, which has no NaN)
    expected = {k: v for k, v in state.items() if k not in ("nan", "sparse")}
    got_sparse = back.pop("sparse")
    assert torch.equal(got_sparse.to_dense(), torch.eye(3))
    assert back == expected
    assert type(back["tuple_leaf"]) is tuple
    assert str(back["neg_zero"]) == "-0.0"


def test_json_leaves_are_inline_in_the_manifest(ckpt: str) -> None:
    torchstow.save({"step": 12, "cfg": {"lr": 0.5}, "t": torch.ones(1)}, ckpt)
    md = torchstow.planning.local_metadata({"step": 12, "cfg": {"lr": 0.5}, "t": torch.ones(1)})
    assert md.state_dict_metadata["step"].encoding == "json"
    assert md.state_dict_metadata["cfg.lr"].value == 0.5
    # Delete the data files: JSON leaves still load from the manifest alone.
    for name in os.listdir(ckpt):
        if name.endswith(".bin"):
            os.unlink(os.path.join(ckpt, name))
    assert torchstow.read(ckpt, keys=["step", "cfg"]) == {"step": 12, "cfg": {"lr": 0.5}}


def test_views_and_non_contiguous_tensors(ckpt: str) -> None:
    base = torch.arange(60.0).reshape(6, 10)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "row_view": base[3],
        "offset_view": base.view(-1)[17:29],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "channels_last": torch.arange(24.0).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last),
        "base": base,
    }
    torchstow.save(state, ckpt)
    back = torchstow.read(ckpt)
    for key, value in state.items():
        assert torch.equal(back[key], value), key
        assert back[key].is_contiguous()
    # Loading into views writes through to their base.
    target_base = torch.zeros(6, 10)
    target = {"transposed": target_base.t(), "strided": torch.zeros(3, 3), "row_view": torch.zeros(10)}
    torchstow.load(target, ckpt, strict=False)
    assert torch.equal(target_base, base)
    assert torch.equal(target["strided"], base[::2, 1::3])


def test_empty_and_zero_dim_tensors(ckpt: str) -> None:
    state = {
        "empty": torch.empty(0),
        "empty_2d": torch.empty(3, 0, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "int_scalar": torch.tensor(-4, dtype=torch.int16),
    }
    torchstow.save(state, ckpt)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    torchstow.load(target, ckpt)
    assert_same_state(state, target)
    assert_same_state(state, torchstow.read(ckpt))


def test_requires_grad_parameters_load_in_place(ckpt: str) -> None:
    layer = torch.nn.Linear(4, 4)
    torchstow.save(layer.state_dict(keep_vars=True), ckpt)
    other = torch.nn.Linear(4, 4)
    sd = other.state_dict(keep_vars=True)
    torchstow.load(sd, ckpt)
    assert torch.equal(other.weight, layer.weight)
    assert other.weight.requires_grad


@pytest.mark.parametrize("thread_count", [1, 2, 4])
def test_thread_counts_and_large_tensors(ckpt: str, thread_count: int) -> None:
    gen = torch.Generator().manual_seed(thread_count)
    state = {f"big{i}": torch.randn(600_000, generator=gen) for i in range(5)}
    state["small"] = torch.arange(10)
    torchstow.save(state, ckpt, storage_options={"thread_count": thread_count})
    files = [f for f in os.listdir(ckpt) if f.endswith(".bin")]
    assert len(files) == min(thread_count, 5)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    torchstow.load(target, ckpt, storage_options={"thread_count": thread_count})
    assert_same_state(state, target)


def test_file_uri_and_path_like(tmp_path: Any) -> None:
    uri = f"file://{tmp_path}/run/step-1"
    torchstow.save({"x": torch.ones(2)}, uri)
    assert os.path.exists(os.path.join(str(tmp_path), "run", "step-1", "manifest.json"))
    assert torch.equal(torchstow.read(tmp_path / "run" / "step-1")["x"], torch.ones(2))
    assert torchstow.latest(f"file://{tmp_path}/run") == uri


def test_fsync_off_still_round_trips(ckpt: str) -> None:
    state = {"x": torch.randn(100)}
    torchstow.save(state, ckpt, storage_options={"fsync": False})
    assert_same_state(state, torchstow.read(ckpt))


def test_save_returns_the_committed_metadata(ckpt: str) -> None:
    md = torchstow.save({"x": torch.ones(2, 3, dtype=torch.float16)}, ckpt, metadata={"epoch": 2})
    entry = md.state_dict_metadata["x"]
    assert isinstance(entry, torchstow.planning.TensorStorageMetadata)
    assert entry.properties.dtype == torch.float16
    assert entry.size == torch.Size([2, 3])
    assert [tuple(c.offsets) for c in entry.chunks] == [(0, 0)]
    assert md.user_metadata == {"epoch": 2}
    assert md.committed_at is not None
