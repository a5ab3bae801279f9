"""CUDA DTensors over a cpu:gloo,cuda:nccl group: checkpoints travel through the
group's CPU backend and land in device memory (needs a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_scenarios import cuda_round_trip, same, values

import torchstow
from dist_pool import WorkerPool


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dtensors_reshard_over_a_cpu_and_cuda_group(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    pool = WorkerPool(2, backend="cpu:gloo,cuda:nccl")
    try:
        results = pool.run(cuda_round_trip, path)
    finally:
        pool.close()
    assert results == [{"device": "cuda", "same": True, "step": 3}] * 2
    assert same(torchstow.read(path)["w"], values("w", (10, 6), 5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_timeout_needs_a_cpu_backend(tmp_path: Path) -> None:
    """A group with only NCCL cannot bound its waits through gloo: a clear error, not a hang."""
    from dist_scenarios import nccl_only_timeout

    outcome = WorkerPool.run_once(1, nccl_only_timeout, str(tmp_path / "ckpt"), timeout=120)[0]
    assert outcome.status == "ok", outcome
    assert outcome.value["timeout_error"].startswith(
        "timeout= needs a process group with a CPU (gloo) backend"
    )
    assert outcome.value["saved_without_timeout"]
