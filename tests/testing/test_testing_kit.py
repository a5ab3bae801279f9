"""The helpers of torchstow.testing itself: the state-dict comparison every test relies on,
and the rank spawner of the multi-process kit (it reports, and never hangs)."""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import pytest
import torch

from torchstow.testing import assert_same_state, run_ranks, state_differences


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)},
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "pair": (torch.ones(2), "tag"),
        "step": 7,
    }


def test_equal_states_have_no_differences() -> None:
    assert state_differences(_state(), _state()) == []
    assert_same_state(_state(), _state())
    nan = torch.full((3,), float("nan"))
    assert_same_state({"x": nan, "f": float("nan")}, {"x": nan.clone(), "f": float("nan")})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["model"].__setitem__("w", s["model"]["w"].double()), "model.w: dtype"),
        (lambda s: s["model"].__setitem__("b", torch.zeros(4)), "model.b: shape (4,) != (3,)"),
        (lambda s: s["model"]["w"].view(-1).__setitem__(4, 4.5), "model.w: values differ"),
        (lambda s: s["model"]["b"].neg_(), "model.b: values differ"),  # -0.0 is not 0.0, bit for bit
        (lambda s: s["optim"]["param_groups"][0].__setitem__("lr", 0.2), "optim.param_groups.0.lr: 0.2"),
        (lambda s: s.__setitem__("pair", list(s["pair"])), "pair: list != tuple"),
        (lambda s: s["model"].pop("b"), "model: keys only in the first []"),
        (lambda s: s.__setitem__("model", dict(reversed(s["model"].items()))), "model: key order"),
        (lambda s: s.__setitem__("step", torch.tensor(7)), "step: Tensor != int"),
    ],
    ids=["dtype", "shape", "value", "negative zero", "leaf", "container type", "key", "order", "kind"],
)
def test_each_difference_is_found_and_named(change: Any, expected: str) -> None:
    changed = _state()
    change(changed)
    found = state_differences(changed, _state())
    assert len(found) == 1, found
    assert found[0].startswith(expected), found
    with pytest.raises(AssertionError, match="differ in 1 place"):
        assert_same_state(changed, _state())


def test_key_order_can_be_ignored_and_mapping_types_count() -> None:
    a = {"x": torch.ones(1), "y": 2}
    assert state_differences(a, {"y": 2, "x": torch.ones(1)}, ordered=False) == []
    assert state_differences(collections.OrderedDict(a), a) == ["<root>: OrderedDict != dict"]


def test_every_difference_is_listed() -> None:
    a = {f"k{i}": torch.zeros(2) for i in range(30)}
    b = {f"k{i}": torch.ones(2) for i in range(30)}
    assert len(state_differences(a, b)) == 30
    with pytest.raises(AssertionError, match=r"differ in 30 place\(s\)(.|\n)*and 10 more"):
        assert_same_state(a, b)


# -- the rank spawner (the functions run in the spawned ranks) -------------------------


def _sum_ranks(rank: int, world_size: int, scale: int) -> int:
    import torch.distributed as dist

    value = torch.tensor([rank * scale])
    dist.all_reduce(value)
    return int(value.item())


def _fails_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 gives up")
    return rank


def _rank_1_dies_or_hangs(rank: int, world_size: int, how: str) -> int:
    if rank == 1 and how == "die":
        os._exit(3)
    if rank == 1:
        time.sleep(600)
    return rank


@pytest.mark.slow
def test_run_ranks_runs_a_real_gloo_group() -> None:
    assert run_ranks(_sum_ranks, 10, world_size=3, timeout=120) == [30, 30, 30]


@pytest.mark.slow
def test_run_ranks_reports_every_rank_when_one_fails_dies_or_hangs() -> None:
    with pytest.raises(AssertionError, match=r"(?s)rank 0: ok.*rank 1: error.*ValueError: rank 1 gives up"):
        run_ranks(_fails_on_rank_1, timeout=120)
    with pytest.raises(AssertionError, match=r"rank 1: dead\nexit code 3"):
        run_ranks(_rank_1_dies_or_hangs, "die", timeout=120)
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank 1: silent\nno answer before the timeout"):
        run_ranks(_rank_1_dies_or_hangs, "hang", timeout=5)
    assert time.monotonic() - start < 25  # the hung rank was killed, not waited for
