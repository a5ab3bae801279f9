"""Saving from and loading into GPU tensors (skipped without CUDA; run on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

import torchstow
from torchstow.testing import assert_same_state

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_save_from_gpu_and_load_into_gpu(ckpt: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {
        "w": torch.randn(1024, 1024, device="cuda", generator=gen),
        "h": torch.randn(300, device="cuda", generator=gen).half(),
        "t": torch.randn(64, 32, device="cuda", generator=gen).t(),
        "step": 5,
    }
    torchstow.save(state, ckpt)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
    torchstow.load(target, ckpt)
    assert target["w"].is_cuda
    assert_same_state(state, target)
    cpu = torchstow.read(ckpt)
    assert not cpu["w"].is_cuda
    assert torch.equal(cpu["w"], state["w"].cpu())


def test_load_gpu_checkpoint_into_cpu_and_back(ckpt: str) -> None:
    torchstow.save({"x": torch.arange(10.0)}, ckpt)
    target = {"x": torch.zeros(10, device="cuda", dtype=torch.float64)}
    torchstow.load(target, ckpt, cast=True)  # dtype differs: cast on load
    assert torch.equal(target["x"].cpu(), torch.arange(10.0, dtype=torch.float64))
