"""A state dict whose structure differs from the checkpoint's where the checkpoint holds
values (a leaf where it stored a container, an empty container where it stored values)
is a StateDictMismatchError, never a load that silently leaves those values out."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torchstow


def _adam(seed: int, stepped: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters())
    if stepped:
        model(torch.ones(1, 3)).sum().backward()
        optim.step()
    return model, optim


def test_a_fresh_optimizer_whose_state_is_empty_is_refused_not_left_without_state(tmp_path: Any) -> None:
    model, optim = _adam(0, stepped=True)
    uri = str(tmp_path / "ck")
    torchstow.save({"model": model, "optim": optim}, uri)
    fresh_model, fresh_optim = _adam(1, stepped=False)
    weight = fresh_model.weight.detach().clone()
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load({"model": fresh_model, "optim": fresh_optim}, uri)
    message = str(info.value)
    assert "optim.state: empty in the state dict; the checkpoint holds 6 value(s) below it" in message
    assert "an optimizer has state once it has stepped" in message
    assert "strict=False" in message
    assert any(p.startswith("optim.state: empty") for p in info.value.mismatched)
    assert torch.equal(fresh_model.weight, weight)  # nothing was loaded
    assert not fresh_optim.state
    # strict=False leaves the empty state empty, as asked, and loads the rest
    torchstow.load({"model": fresh_model, "optim": fresh_optim}, uri, strict=False)
    assert torch.equal(fresh_model.weight, model.weight)
    assert not fresh_optim.state
    # with its state created, the optimizer loads all of it
    _, ready = _adam(1, stepped=True)
    torchstow.load({"optim": ready}, uri)
    for key, value in optim.state_dict()["state"][0].items():
        assert torch.equal(ready.state_dict()["state"][0][key], value), key


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("leaf", [5, None, torch.zeros(2)], ids=["int", "None", "tensor"])
def test_a_leaf_where_the_checkpoint_holds_a_container_is_a_mismatch(
    tmp_path: Any, strict: bool, leaf: Any
) -> None:
    uri = str(tmp_path / "ck")
    torchstow.save({"n": {"a": 1, "b": torch.ones(2)}, "w": torch.ones(3)}, uri)
    target = {"n": leaf, "w": torch.zeros(3)}
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load(target, uri, strict=strict)
    assert "n: the checkpoint holds 2 value(s) below it (n.a, 1 more), the state dict " in str(info.value)
    assert info.value.missing_keys == []  # not missing: held otherwise
    assert target["n"] is leaf and not target["w"].any()  # nothing was loaded


def test_a_sparse_tensor_where_the_checkpoint_holds_a_dense_one_is_named_as_such(tmp_path: Any) -> None:
    uri = str(tmp_path / "ck")
    torchstow.save({"w": torch.ones(2, 3)}, uri)
    with pytest.raises(
        torchstow.StateDictMismatchError,
        match="w: the checkpoint holds a tensor, the state dict a sparse_coo tensor",
    ):
        torchstow.load({"w": torch.zeros(2, 3).to_sparse()}, uri)


@pytest.mark.parametrize("strict", [True, False])
def test_an_empty_container_where_the_checkpoint_holds_one_value_is_a_mismatch(
    tmp_path: Any, strict: bool
) -> None:
    uri = str(tmp_path / "ck")
    torchstow.save({"n": 5, "w": torch.ones(3)}, uri)
    target: dict[str, Any] = {"n": {}, "w": torch.zeros(3)}
    with pytest.raises(
        torchstow.StateDictMismatchError,
        match="n: the checkpoint holds it as one value, the state dict an empty container",
    ):
        torchstow.load(target, uri, strict=strict)
    assert target["n"] == {} and not target["w"].any()


def test_an_empty_list_where_the_checkpoint_holds_values_below_it_is_refused_when_strict(
    tmp_path: Any,
) -> None:
    # a list without tensors is one leaf of the state dict; the checkpoint stores this one's
    # items as keys of their own (as DCP stores param_groups.0.lr)
    uri = str(tmp_path / "ck")
    torchstow.save({"groups": [{"lr": torch.tensor(0.1)}]}, uri)
    target: dict[str, Any] = {"groups": []}
    with pytest.raises(
        torchstow.StateDictMismatchError,
        match=r"groups: empty in the state dict; the checkpoint holds 1 value\(s\) below it \(groups\.0\.lr",
    ):
        torchstow.load(target, uri)
    torchstow.load(target, uri, strict=False)
    assert target == {"groups": []}
