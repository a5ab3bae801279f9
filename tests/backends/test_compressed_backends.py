"""Compressed checkpoints on every built-in backend: local files, shm://, S3 (moto server)
and the fault injector wrapping local files, saved synchronously and asynchronously,
read back bit-exact with their codecs recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format.compression import BYTEPLANES, ZSTD
from torchstow.testing.compare import assert_same_state

from storage_helpers import s3_options, unique


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    return {
        "fp32": torch.randn(256, 64, generator=gen) * 0.02,
        "bf16": (torch.randn(128, 64, generator=gen) * 0.02).to(torch.bfloat16),
        "fp16": (torch.randn(128, 64, generator=gen) * 0.02).to(torch.float16),
        "ints": torch.arange(8192) % 13,
        "mask": torch.arange(4096) % 5 == 0,
        "extra": {"betas": (0.9, 0.999), "names": ("n" * 500, "m"), "step": 12},
    }


@pytest.fixture(params=["file", "shm", "s3", "faulty+file"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A checkpoint URI on each built-in backend, with its storage options."""
    kind = request.param
    if kind == "file":
        return str(tmp_path / "c"), {}
    if kind == "faulty+file":
        return f"faulty+file://{tmp_path}/c", {}
    if kind == "shm":
        return "shm://run/c", {"shm_dir": request.getfixturevalue("shm_dir")}
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/{unique()}/c", s3_options(endpoint)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_compressed_round_trip(location: tuple[str, dict[str, Any]], asynchronous: bool) -> None:
    uri, options = location
    state = _state()
    if asynchronous:
        torchstow.async_save(state, uri, storage_options=options, compression="zstd").result()
    else:
        torchstow.save(state, uri, storage_options=options, compression="zstd")
    metadata = torchstow.storage_reader(uri, storage_options=options).read_metadata()
    codecs = {index.fqn: info.codec for index, info in metadata.storage_data.items()}
    assert codecs["fp32"] == codecs["bf16"] == codecs["fp16"] == BYTEPLANES
    assert codecs["ints"] == codecs["mask"] == codecs["extra.names"] == ZSTD
    assert_same_state(torchstow.read(uri, storage_options=options), state)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in _state().items()}
    torchstow.load(target, uri, storage_options=options)
    assert_same_state(target, state)
    assert torchstow.verify(uri, storage_options=options).ok
