"""A StateDictMismatchError's message stays short however many keys disagree, and says
which prefix explains them; the exception keeps the full lists."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torchstow
from torchstow.checkpointing import CheckpointReader, RankInfo
from torchstow.core.planning.mismatch import prefix_hint

KEYS = [f"layers.{i}.weight" for i in range(2000)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: Any) -> str:
    uri = str(tmp_path_factory.mktemp("mismatch") / "ck")
    torchstow.save({key: torch.zeros(1) for key in KEYS}, uri)
    return uri


def test_a_ddp_prefix_on_every_key_gives_a_short_message_with_a_hint(saved: str) -> None:
    target = {f"module.{key}": torch.ones(1) for key in KEYS}
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load(target, saved)
    message = str(info.value)
    assert len(message) < 3000, len(message)  # was 96 KB here, 1.2 MB at 22,000 keys
    assert "2000 key(s) of the state dict missing from the checkpoint" in message
    assert "missing from the checkpoint: module.layers.0.weight" in message
    assert "module.layers.1999.weight" not in message
    assert "1990 more (all in the exception's missing_keys)" in message
    assert "2000 of the 2000 missing key(s) are in the checkpoint without their leading 'module.'" in message
    assert "DistributedDataParallel" in message
    assert "strict=False" in message
    assert info.value.missing_keys == list(target)
    assert sorted(info.value.unexpected_keys) == sorted(KEYS)
    assert all(bool(value.eq(1).all()) for value in target.values())


def test_a_checkpoint_saved_from_a_compiled_model_is_named(tmp_path: Any) -> None:
    uri = str(tmp_path / "ck")
    torchstow.save({f"_orig_mod.{key}": torch.zeros(1) for key in KEYS[:50]}, uri)
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load({key: torch.zeros(1) for key in KEYS[:50]}, uri)
    message = str(info.value)
    assert "50 of the 50 missing key(s) are in the checkpoint with '_orig_mod.' in front" in message
    assert "torch.compile" in message
    assert len(info.value.missing_keys) == 50


def test_many_dtype_mismatches_are_counted_not_all_listed(saved: str) -> None:
    target = {key: torch.zeros(1, dtype=torch.float64) for key in KEYS}
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load(target, saved)
    message = str(info.value)
    assert len(message) < 3000, len(message)
    assert "layers.0.weight: dtype float32 in the checkpoint, float64 in the state dict" in message
    assert "1990 more (all in the exception's mismatched)" in message
    assert "cast=True" in message
    assert len(info.value.mismatched) == 2000


def test_the_checkpoint_reader_strict_message_is_bounded_too(saved: str) -> None:
    target = {f"module.{key}": None for key in KEYS}
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        CheckpointReader(RankInfo()).read(saved, target, strict=True)
    message = str(info.value)
    assert len(message) < 3000, len(message)
    assert "without their leading 'module.'" in message
    assert info.value.missing_keys == list(target)


def test_prefix_hint_finds_a_renamed_prefix_and_only_one_that_explains_most_keys() -> None:
    ours = [f"module.{key}" for key in KEYS[:20]]
    theirs = [f"model.{key}" for key in KEYS[:20]]
    hint = prefix_hint(ours, theirs)
    assert hint is not None
    assert (
        "20 of the 20 missing key(s) are in the checkpoint with 'model.' in place of their leading 'module.'"
        in hint
    )
    # nested wrappers: DDP around a compiled model
    hint = prefix_hint([f"module._orig_mod.{key}" for key in KEYS[:5]], KEYS[:5])
    assert hint is not None and "without their leading 'module._orig_mod.'" in hint
    # one key of twenty explained is no hint
    assert prefix_hint(["module.a", *(f"x{i}" for i in range(19))], ["a", "b"]) is None
    assert prefix_hint(["a.weight"], ["b.weight"]) is None  # one key renamed is no pattern
    assert prefix_hint(["a.weight", "a.bias"], ["b.weight", "b.bias"]) is not None
    assert prefix_hint(["module.w"], ["w"]) is not None
    assert prefix_hint(["a"], []) is None
