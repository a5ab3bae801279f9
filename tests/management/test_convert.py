"""convert: torchstow <-> safetensors, torch.save and DCP, streaming one tensor at a time."""

from __future__ import annotations

import json
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchstow
from torchstow.interop.convert import ConvertReport, Selection
from torchstow.interop.safetensors_format import INDEX, plan_shards
from torchstow.interop.sources import Source, TensorSpec
from torchstow.interop.targets import to_safetensors, to_torchstow
from torchstow.testing import assert_same_state


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    return {
        "model": {
            "embed.weight": torch.randn(50, 8, generator=gen),
            "layers": [
                {"w": torch.randn(8, 8, generator=gen).to(torch.bfloat16), "n": torch.arange(8)},
                {"w": torch.randn(8, 8, generator=gen).to(torch.bfloat16), "n": torch.arange(8) * 2},
            ],
        },
        "optim": {"lr": 0.01, "betas": (0.9, 0.99)},
        "name": "tiny",
        "step": 12,
    }


@pytest.fixture
def saved(tmp_path: Path) -> str:
    ckpt = str(tmp_path / "step-12")
    torchstow.save(_state(), ckpt, metadata={"step": 12})
    return ckpt


def _flat_model(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    model = state["model"]
    flat = {"embed.weight": model["embed.weight"]}
    for i, layer in enumerate(model["layers"]):
        flat.update({f"layers.{i}.w": layer["w"], f"layers.{i}.n": layer["n"]})
    return flat


def test_to_safetensors_as_hugging_face_writes_it(saved: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    report = torchstow.convert(saved, out, to="safetensors", max_shard_bytes=1700)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert files == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    index = json.loads((out / INDEX).read_text())
    loaded: dict[str, torch.Tensor] = {}
    for name in files:
        loaded.update(load_file(str(out / name)))
        with safe_open(str(out / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "name": "tiny"}
    expected = {f"model.{k}": v for k, v in _flat_model(_state()).items()}
    assert loaded.keys() == expected.keys() == index["weight_map"].keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values()) == report.nbytes
    assert {index["weight_map"][k] for k in expected} == set(files)
    assert sorted(k for k, _ in report.skipped) == ["optim.betas", "optim.lr", "step"]
    assert report.tensors == 5 and report.files[-1] == str(out / INDEX)


def test_keys_prefix_and_dtype_cast(saved: str, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    torchstow.convert(saved, out, to="safetensors", keys="model.", dtype="float16")
    (shard,) = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert shard == "model-00001-of-00001.safetensors"
    loaded = load_file(str(out / shard))
    for key, tensor in _flat_model(_state()).items():
        want = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
        assert loaded[key].dtype == want.dtype and torch.equal(loaded[key], want), key
    with pytest.raises(KeyError, match="no key"):
        torchstow.convert(saved, tmp_path / "none", to="safetensors", keys="decoder")
    with pytest.raises(ValueError, match="floating"):
        torchstow.convert(saved, tmp_path / "none", to="safetensors", dtype="int8")


def test_torch_save_round_trip(saved: str, tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    torchstow.convert(saved, pt, to="torch")
    assert_same_state(torch.load(pt, weights_only=True), _state())
    with pytest.raises(torchstow.CheckpointExistsError):
        torchstow.convert(saved, pt, to="torch")
    back = str(tmp_path / "back")
    report = torchstow.convert(pt, back, to="torchstow")
    assert report.source_format == "torch"
    assert_same_state(torchstow.read(back), _state())


def test_from_safetensors_file_and_directory(tmp_path: Path) -> None:
    tensors = {"a.weight": torch.randn(4, 4), "a.bias": torch.zeros(4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "one.safetensors"), metadata={"format": "pt", "origin": "test"})
    report = torchstow.convert(tmp_path / "one.safetensors", tmp_path / "ts", to="torchstow")
    assert report.source_format == "safetensors"
    assert_same_state(torchstow.read(tmp_path / "ts"), tensors, ordered=False)  # safetensors sorts its keys
    assert torchstow.info(tmp_path / "ts").user_metadata == {"origin": "test"}
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    torchstow.convert(folder, tmp_path / "t.pt", to="torch", keys="a")
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)
    assert_same_state(loaded, {"weight": tensors["a.weight"], "bias": tensors["a.bias"]}, ordered=False)


def test_to_dcp_loads_with_dcp(saved: str, tmp_path: Path) -> None:
    out = str(tmp_path / "dcp")
    torchstow.convert(saved, out, to="dcp")
    assert ".metadata" in os.listdir(out)
    target = _state()
    for layer in target["model"]["layers"]:
        layer["w"].zero_()
        layer["n"].zero_()
    target["model"]["embed.weight"].zero_()
    target["step"] = 0
    dcp.load(target, storage_reader=dcp.FileSystemReader(out), no_dist=True)
    assert_same_state(target, _state())


def test_from_a_stock_dcp_checkpoint(tmp_path: Path) -> None:
    out = str(tmp_path / "stock")
    state = {"model": {"w": torch.randn(3, 5), "n": torch.arange(4)}, "epoch": 2, "tag": "stock"}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out), no_dist=True)
    report = torchstow.convert(out, tmp_path / "x.pt", to="torch")
    assert report.source_format == "dcp"
    assert_same_state(torch.load(tmp_path / "x.pt", weights_only=True), state)
    verified = torchstow.verify(out)
    assert verified.ok and verified.checked_bytes == 3 * 5 * 4 + 4 * 8


class _CountingSource(Source):
    """``count`` tensors of ``numel`` floats made on demand; tracks how many are alive at once."""

    format = "test"

    def __init__(self, count: int, numel: int) -> None:
        self.uri = "counting"
        self.user_metadata = {}
        self.specs = {f"t{i}": TensorSpec(torch.float32, (numel,)) for i in range(count)}
        self.alive = 0
        self.most_alive = 0
        self._lock = threading.Lock()

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1

    def read_tensor(self, key: str) -> torch.Tensor:
        tensor = torch.full(self.specs[key].shape, float(key[1:]))
        with self._lock:
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(tensor, self._gone)
        return tensor

    def read_object(self, key: str) -> Any:
        raise KeyError(key)


def test_converters_hold_a_few_tensors_at_a_time(tmp_path: Path) -> None:
    source = _CountingSource(count=24, numel=1 << 20)  # 24 tensors of 4 MiB
    report = ConvertReport("counting", str(tmp_path / "hf"), "test", "safetensors")
    to_safetensors(Selection(source, None, None, None), str(tmp_path / "hf"), 20 << 20, False, report)
    assert source.most_alive <= 2  # the one being written, and the next, being read
    assert len(report.files) == 1 + 5  # five shards of at most 20 MiB, and the index
    source = _CountingSource(count=24, numel=1 << 20)
    report = ConvertReport("counting", str(tmp_path / "ts"), "test", "torchstow")
    to_torchstow(
        Selection(source, None, None, None), str(tmp_path / "ts"), {"thread_count": 2}, False, report
    )
    assert source.most_alive <= 4
    assert torch.equal(torchstow.read(tmp_path / "ts", keys=["t23"])["t23"], torch.full((1 << 20,), 23.0))


def test_shard_plan_follows_hugging_face() -> None:
    shards = plan_shards([("a", 6), ("b", 5), ("c", 20), ("d", 1)], 10)
    assert [(s.name, s.keys, s.nbytes) for s in shards] == [
        ("model-00001-of-00003.safetensors", ["a"], 6),
        ("model-00002-of-00003.safetensors", ["c"], 20),
        ("model-00003-of-00003.safetensors", ["b", "d"], 6),
    ]
    assert [s.keys for s in plan_shards([], 10)] == [[]]
