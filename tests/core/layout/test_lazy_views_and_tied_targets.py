"""Inputs that used to go silently wrong: lazily conjugated or negated tensors, and one
target tensor under two keys (tied weights)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import torchstow


def lazy() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tensors carrying conjugate and negative bits, and the values they stand for."""
    z = torch.complex(torch.arange(6.0), torch.arange(6.0) + 10).reshape(2, 3)
    views = {"conj": z.conj(), "neg_imag": z.conj().imag, "conj_row": z.conj()[1]}
    assert views["conj"].is_conj() and views["neg_imag"].is_neg()
    values = {key: view.resolve_conj().resolve_neg().clone() for key, view in views.items()}
    return views, values


def test_conjugate_and_negative_views_save_their_values(ckpt: str) -> None:
    views, values = lazy()
    torchstow.save(views, ckpt)
    got = torchstow.read(ckpt)
    for key, value in values.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(got["neg_imag"], -torch.arange(6.0).reshape(2, 3) - 10)


def test_conjugate_and_negative_views_through_the_async_stager(ckpt: str) -> None:
    views, values = lazy()
    torchstow.async_save(views, ckpt).result()
    got = torchstow.read(ckpt)
    for key, value in values.items():
        assert torch.equal(got[key], value), key


def test_loading_into_a_conjugate_view_stores_the_values_it_shows(ckpt: str) -> None:
    _, values = lazy()
    torchstow.save({"z": values["conj"]}, ckpt)
    target = torch.zeros(2, 3, dtype=torch.complex64).conj()
    torchstow.load({"z": target}, ckpt)
    assert torch.equal(target.resolve_conj(), values["conj"])


def test_tied_weights_with_equal_values_load(ckpt: str) -> None:
    weight = torch.randn(8, 4)
    torchstow.save({"embed": weight, "head": weight}, ckpt)
    tied = torch.zeros(8, 4)
    state = {"embed": tied, "head": tied}
    torchstow.load(state, ckpt)
    assert state["embed"] is state["head"] is tied
    assert torch.equal(tied, weight)


def test_a_tied_target_for_different_saved_values_is_refused_up_front(ckpt: str) -> None:
    torchstow.save({"a": torch.ones(16), "b": torch.full((16,), 2.0)}, ckpt)
    tied = torch.zeros(16)
    with pytest.raises(
        torchstow.StateDictMismatchError, match=r"'a' and 'b' are one tensor in the state dict"
    ):
        torchstow.load({"a": tied, "b": tied}, ckpt)
    assert not tied.any(), "refused before reading anything"


def test_tied_keys_whose_values_differ_are_refused_after_reading(ckpt: str) -> None:
    # Equal checksums recorded for different bytes (and verification off): only the
    # comparison after the read can tell; it must not be reported as corruption.
    torchstow.save({"a": torch.ones(16), "b": torch.full((16,), 2.0)}, ckpt, format_version=1)  # JSON edited
    path = os.path.join(ckpt, "manifest.json")
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    doc["entries"]["b"]["crc32c"] = doc["entries"]["a"]["crc32c"]
    with open(path, "w") as f:
        json.dump(doc, f)
    tied = torch.zeros(16)
    with pytest.raises(torchstow.StateDictMismatchError, match="holds different values for them"):
        torchstow.load({"a": tied, "b": tied}, ckpt, storage_options={"verify_checksums": False})


def test_overlapping_views_load_when_the_checkpoint_agrees_and_are_refused_when_not(ckpt: str) -> None:
    # Different views of one memory (a strided slice, a transposed view): each key used to be
    # read straight into it, so one key silently showed another's values.
    saved = torch.arange(6.0)
    torchstow.save({"a": saved, "even": saved[::2], "odd": saved[1::2], "t": saved.view(2, 3).t()}, ckpt)
    memory = torch.zeros(6)
    views = {"a": memory, "even": memory[::2], "odd": memory[1::2], "t": memory.view(2, 3).t()}
    torchstow.load(views, ckpt)
    assert torch.equal(memory, saved)

    other = ckpt + "-other"
    torchstow.save({"a": torch.arange(6.0), "even": torch.arange(3.0) + 100}, other)
    memory = torch.zeros(6)
    with pytest.raises(torchstow.StateDictMismatchError, match="'even' and 'a' are overlapping views"):
        torchstow.load({"a": memory, "even": memory[::2]}, other)


def test_a_tied_meta_target_stays_tied(ckpt: str) -> None:
    # A model built on the meta device with tied weights: one new tensor under both keys
    # (it used to become two, silently untying the model and taking whatever each key held).
    weight = torch.randn(4, 3)
    torchstow.save({"embed": weight, "head": weight}, ckpt)
    with torch.device("meta"):
        tied = torch.nn.Linear(3, 4, bias=False).weight
    state = {"embed": tied, "head": tied}
    torchstow.load(state, ckpt)
    assert state["embed"] is state["head"] and state["embed"].device.type == "cpu"
    assert torch.equal(state["embed"], weight)

    other = ckpt + "-untied"
    torchstow.save({"embed": weight, "head": weight + 1}, other)
    with pytest.raises(torchstow.StateDictMismatchError, match="are one tensor in the state dict"):
        torchstow.load({"embed": tied, "head": tied}, other)
