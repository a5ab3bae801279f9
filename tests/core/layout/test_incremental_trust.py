"""save(sd, uri, base=, trust_version_counter=True): a tensor hashed by an earlier such save
in this process, unchanged since by its version counter, is not read again; anything
changed in place, replaced, or loaded into is hashed; without the flag every tensor is
hashed as before. Results (bytes written, loaded values) are those of a save without it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import blake3
import pytest
import torch

import torchstow
from manifest_json import manifest_doc
from torchstow.core.layout import incremental
from torchstow.core.staging.stager import StateDictStager
from torchstow.testing import assert_same_state


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every tensor item hashed from memory while the test runs."""
    sizes: list[int] = []
    real = incremental.content_hash

    def counting(view: memoryview) -> str:
        sizes.append(len(view))
        return real(view)

    monkeypatch.setattr(incremental, "content_hash", counting)
    return sizes


class FineTune(torch.nn.Module):
    """Four frozen 1 MiB weights and a small trainable head."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.frozen = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(256, 1024, generator=gen), requires_grad=False) for _ in range(4)
        )
        self.head = torch.nn.Linear(64, 64)


def _trainer() -> tuple[FineTune, torch.optim.Optimizer]:
    model = FineTune()
    return model, torch.optim.AdamW(model.head.parameters())


def _step(model: FineTune, optimizer: torch.optim.Optimizer) -> None:
    model.head(torch.ones(2, 64)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _state(model: FineTune, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def _trainable_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The head's parameters and every tensor of its optimizer state."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [t for per_param in optimizer.state.values() for t in per_param.values()]
    return sum(t.nbytes for t in params + state)


def test_frozen_tensors_are_not_hashed_again_and_the_result_is_a_plain_incremental_save(
    tmp_path: Path, hashed: list[int]
) -> None:
    model, optimizer = _trainer()
    _step(model, optimizer)
    torchstow.save(_state(model, optimizer), tmp_path / "1")
    _step(model, optimizer)
    state = _state(model, optimizer)
    torchstow.save(state, tmp_path / "2", base=tmp_path / "1", trust_version_counter=True)
    every_tensor = sum(hashed)
    assert every_tensor >= 4 << 20  # the first trusting save hashes everything
    hashed.clear()
    _step(model, optimizer)
    state = _state(model, optimizer)
    torchstow.save(state, tmp_path / "3", base=tmp_path / "2", trust_version_counter=True)
    trainable = _trainable_bytes(optimizer)
    assert sum(hashed) == trainable  # the 4 MiB of frozen weights were not read
    hashed.clear()
    torchstow.save(state, tmp_path / "3-plain", base=tmp_path / "2")  # the flag off: as before
    assert sum(hashed) == every_tensor
    written = torchstow.info(tmp_path / "3").nbytes_written
    assert written == torchstow.info(tmp_path / "3-plain").nbytes_written
    assert trainable <= written < trainable + 4096  # the optimizer's objects besides
    torchstow.delete(tmp_path / "1")
    torchstow.delete(tmp_path / "2")
    assert_same_state(torchstow.read(tmp_path / "3"), torchstow.read(tmp_path / "3-plain"))
    fresh_model, fresh_optimizer = _trainer()
    _step(fresh_model, fresh_optimizer)
    target = _state(fresh_model, fresh_optimizer)
    torchstow.load(target, tmp_path / "3")
    fresh_optimizer.load_state_dict(target["optim"])
    assert_same_state(_state(fresh_model, fresh_optimizer), state)


def test_in_place_changes_are_written_and_equal_bytes_in_a_new_tensor_are_hashed_and_shared(
    tmp_path: Path, hashed: list[int]
) -> None:
    gen = torch.Generator().manual_seed(1)
    state = {name: torch.randn(256, 256, generator=gen) for name in ("a", "b", "c")}  # 256 KiB each
    with torch.inference_mode():
        state["d"] = torch.ones(256, 256)  # no version counter: hashed every time
    torchstow.save(state, tmp_path / "1")
    torchstow.save(state, tmp_path / "2", base=tmp_path / "1", trust_version_counter=True)
    hashed.clear()
    with torch.no_grad():
        state["a"].add_(1)
    state["b"] = state["b"].clone()  # a new tensor, the same bytes
    torchstow.save(state, tmp_path / "3", base=tmp_path / "2", trust_version_counter=True)
    assert sorted(hashed) == [256 * 1024] * 3  # a, b and d; c untouched
    assert torchstow.info(tmp_path / "3").nbytes_written == 256 * 1024  # only a
    torchstow.delete(tmp_path / "1")
    torchstow.delete(tmp_path / "2")
    assert_same_state(torchstow.read(tmp_path / "3"), state)


def test_a_load_in_place_makes_the_next_save_hash_what_it_loaded(tmp_path: Path, hashed: list[int]) -> None:
    gen = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(512, 256, generator=gen), "v": torch.randn(64, generator=gen)}
    other = {"w": state["w"] * 3, "v": state["v"].clone()}
    torchstow.save(other, tmp_path / "other")
    torchstow.save(state, tmp_path / "1")
    torchstow.save(state, tmp_path / "2", base=tmp_path / "1", trust_version_counter=True)
    version = state["w"]._version
    torchstow.load(state, tmp_path / "other")
    assert state["w"]._version == version  # the load wrote the bytes without the counter
    assert torch.equal(state["w"], other["w"])
    hashed.clear()
    torchstow.save(state, tmp_path / "3", base=tmp_path / "2", trust_version_counter=True)
    assert sorted(hashed) == [64 * 4, 512 * 256 * 4]
    assert torchstow.info(tmp_path / "3").nbytes_written == 512 * 256 * 4
    assert_same_state(torchstow.read(tmp_path / "3"), other)


def test_async_saves_reuse_digests_noted_while_staging(tmp_path: Path, hashed: list[int]) -> None:
    model, optimizer = _trainer()
    _step(model, optimizer)
    torchstow.async_save(_state(model, optimizer), tmp_path / "1").result()
    _step(model, optimizer)
    torchstow.async_save(
        _state(model, optimizer), tmp_path / "2", base=tmp_path / "1", trust_version_counter=True
    ).result()
    hashed.clear()
    _step(model, optimizer)
    state = _state(model, optimizer)
    pending = torchstow.async_save(state, tmp_path / "3", base=tmp_path / "2", trust_version_counter=True)
    pending.staged()
    with torch.no_grad():  # training goes on once staged: the save keeps what was staged
        for p in model.frozen:
            p.zero_()
    pending.result()
    trainable = _trainable_bytes(optimizer)
    assert sum(hashed) == trainable
    assert trainable <= torchstow.info(tmp_path / "3").nbytes_written < trainable + 4096
    hashed.clear()
    torchstow.async_save(state, tmp_path / "4", base=tmp_path / "3", trust_version_counter=True).result()
    assert sum(hashed) == 4 << 20  # the zeroed weights (their counters moved), nothing else
    assert torchstow.info(tmp_path / "4").nbytes_written >= 4 << 20
    saved = torchstow.read(tmp_path / "3")["model"]
    assert torch.equal(saved["frozen.0"], FineTune().frozen[0])
    assert_same_state(torchstow.read(tmp_path / "4")["model"], dict(state["model"]))


def test_a_write_behind_the_counter_is_caught_when_the_base_differs_and_digests_stay_honest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gen = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(256, 256, generator=gen)}
    torchstow.save({"w": state["w"] * 5}, tmp_path / "elsewhere")
    torchstow.save(state, tmp_path / "1")
    torchstow.save(state, tmp_path / "2", base=tmp_path / "1", trust_version_counter=True)
    state["w"].data.mul_(2)  # not seen by the counter (documented)
    with caplog.at_level(logging.WARNING, logger="torchstow"):
        torchstow.save(state, tmp_path / "3", base=tmp_path / "elsewhere", trust_version_counter=True)
    assert "changed without its version counter moving" in caplog.text
    assert torchstow.info(tmp_path / "3").nbytes_written == 256 * 256 * 4
    entry = manifest_doc(tmp_path / "3")["entries"]["w"]
    assert entry["blake3"] == blake3.blake3(state["w"].numpy().tobytes()).hexdigest()
    assert_same_state(torchstow.read(tmp_path / "3"), state)


def test_a_staging_buffer_refilled_by_the_stager_is_hashed_again(tmp_path: Path, hashed: list[int]) -> None:
    gen = torch.Generator().manual_seed(4)
    state = {"frozen": torch.randn(256, 256, generator=gen), "trained": torch.randn(256, 256, generator=gen)}
    stager = StateDictStager()
    torchstow.save(stager.stage(state), tmp_path / "1")
    torchstow.save(stager.stage(state), tmp_path / "2", base=tmp_path / "1", trust_version_counter=True)
    with torch.no_grad():
        state["trained"].mul_(-1)
    hashed.clear()
    staged = stager.stage(state)  # the same buffers, new tensors over them
    torchstow.save(staged, tmp_path / "3", base=tmp_path / "2", trust_version_counter=True)
    assert sorted(hashed) == [256 * 256 * 4] * 2  # the stager's copy_ moves no counter
    assert torchstow.info(tmp_path / "3").nbytes_written == 256 * 256 * 4
    assert_same_state(torchstow.read(tmp_path / "3"), state)
