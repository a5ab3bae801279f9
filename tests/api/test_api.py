"""The user-facing API: read, info, list/latest/delete, strictness, bad input."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import torch

import torchstow
import torchstow.planning
from torchstow.testing import assert_same_state


@pytest.fixture
def saved(ckpt: str) -> dict[str, Any]:
    state = {
        "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)},
        "optim": {"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.1}]},
        "layers": [torch.zeros(2), torch.full((2,), 5.0)],
        "step": 40,
    }
    torchstow.save(state, ckpt, metadata={"epoch": 3, "tag": "nightly"})
    return state


def test_read_everything_gives_full_cpu_tensors(ckpt: str, saved: dict[str, Any]) -> None:
    back = torchstow.read(ckpt)
    assert list(back) == ["model", "optim", "layers", "step"]
    assert torch.equal(back["model"]["w"], saved["model"]["w"])
    assert back["optim"]["state"][0]["step"].item() == 4.0
    assert back["optim"]["param_groups"] == [{"lr": 0.1}]
    assert isinstance(back["layers"], list)
    assert back["step"] == 40


def test_read_a_key_subset(ckpt: str, saved: dict[str, Any]) -> None:
    assert_same_state(torchstow.read(ckpt, keys=["model.w"]), {"model": {"w": saved["model"]["w"]}})
    only_model = torchstow.read(ckpt, keys=["model"])
    assert set(only_model) == {"model"}
    assert set(only_model["model"]) == {"w", "b"}
    # A subset of a list keeps the index: no element silently moves.
    partial = torchstow.read(ckpt, keys=["layers.1", "step"])
    assert list(partial) == ["layers", "step"]
    assert list(partial["layers"]) == [1]
    assert torch.equal(partial["layers"][1], torch.full((2,), 5.0))
    assert torchstow.read(ckpt, keys="step") == {"step": 40}


def test_read_unknown_key_names_it(ckpt: str, saved: dict[str, Any]) -> None:
    with pytest.raises(KeyError, match=r"'model\.nope'"):
        torchstow.read(ckpt, keys=["model.nope"])


def test_read_of_a_subset_reads_only_those_bytes(ckpt: str, saved: dict[str, Any]) -> None:
    # Remove every data file but keep the manifest: a JSON-only subset still reads,
    # and a tensor subset fails on the missing file rather than returning garbage.
    for name in os.listdir(ckpt):
        if name.endswith(".bin"):
            os.unlink(os.path.join(ckpt, name))
    assert torchstow.read(ckpt, keys=["step", "optim.param_groups"]) == {
        "step": 40,
        "optim": {"param_groups": [{"lr": 0.1}]},
    }
    with pytest.raises(
        torchstow.CorruptCheckpointError,
        match=r"data-.*\.bin is missing, though the committed manifest lists it",
    ):
        torchstow.read(ckpt, keys=["model.w"])


def test_info_reads_only_the_manifest(ckpt: str, saved: dict[str, Any]) -> None:
    nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".bin"))
    for name in os.listdir(ckpt):
        if name.endswith(".bin"):
            os.unlink(os.path.join(ckpt, name))
    info = torchstow.info(ckpt)
    assert info.user_metadata == {"epoch": 3, "tag": "nightly"}
    assert info.num_entries == 7
    assert 0 < info.nbytes <= nbytes
    assert info.committed_at is not None and abs(info.committed_at - time.time()) < 600
    assert info.format_version == 2
    assert info.uri == ckpt


def test_list_latest_and_delete(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    for step in (100, 20, 3):
        torchstow.save({"x": torch.tensor(float(step))}, os.path.join(root, f"step-{step}"))
    torchstow.save({"x": torch.tensor(-1.0)}, os.path.join(root, "final"))
    os.makedirs(os.path.join(root, "not-a-checkpoint"))

    infos = torchstow.list_checkpoints(root)
    assert [os.path.basename(i.uri) for i in infos] == ["final", "step-3", "step-20", "step-100"]
    assert [i.step for i in infos] == [None, 3, 20, 100]
    assert torchstow.latest(root) == os.path.join(root, "step-100")

    torchstow.delete(os.path.join(root, "step-100"))
    assert not os.path.exists(os.path.join(root, "step-100"))
    assert torchstow.latest(root) == os.path.join(root, "step-20")
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.delete(os.path.join(root, "step-100"))


def test_latest_orders_equal_steps_by_commit_time(tmp_path: Any) -> None:
    root = str(tmp_path)
    torchstow.save({"x": torch.ones(1)}, os.path.join(root, "b-step-5"))
    torchstow.save({"x": torch.ones(1)}, os.path.join(root, "a-step-5"))
    assert torchstow.latest(root) == os.path.join(root, "a-step-5")


def test_latest_of_missing_or_empty_prefix_is_none(tmp_path: Any) -> None:
    assert torchstow.latest(str(tmp_path / "nothing")) is None
    assert torchstow.latest(str(tmp_path)) is None
    assert torchstow.list_checkpoints(str(tmp_path / "nothing")) == []


def test_delete_leaves_foreign_files_alone(ckpt: str, saved: dict[str, Any]) -> None:
    with open(os.path.join(ckpt, "notes.txt"), "w") as f:
        f.write("mine")
    torchstow.delete(ckpt)
    assert os.listdir(ckpt) == ["notes.txt"]
    with pytest.raises(torchstow.CheckpointNotFoundError):
        torchstow.info(ckpt)


def test_strict_load_names_every_mismatch(ckpt: str, saved: dict[str, Any]) -> None:
    target = {
        "model": {"w": torch.zeros(3, 2), "b": torch.zeros(3, dtype=torch.float64), "extra": torch.zeros(1)},
        "step": 0,
    }
    with pytest.raises(torchstow.StateDictMismatchError) as info:
        torchstow.load(target, ckpt)
    message = str(info.value)
    assert info.value.missing_keys == ["model.extra"]
    assert "optim.param_groups" in info.value.unexpected_keys
    assert "missing from the checkpoint: model.extra" in message
    assert "model.w: shape [2, 3] in the checkpoint, [3, 2] in the state dict" in message
    assert "model.b: dtype float32 in the checkpoint, float64 in the state dict" in message
    assert "cast=True" in message
    assert "strict=False" in message
    assert isinstance(info.value, RuntimeError)
    # Nothing was loaded.
    assert target["step"] == 0
    assert not target["model"]["b"].any()


def test_keys_only_in_the_checkpoint_are_ignored(ckpt: str, saved: dict[str, Any]) -> None:
    target = {"model": {"w": torch.zeros(2, 3)}}
    torchstow.load(target, ckpt)
    assert torch.equal(target["model"]["w"], saved["model"]["w"])
    assert list(target) == ["model"]


def test_non_strict_leaves_missing_keys_and_casts_only_when_asked(ckpt: str, saved: dict[str, Any]) -> None:
    target = {"model": {"b": torch.zeros(3, dtype=torch.float64), "extra": torch.zeros(1)}, "step": 0}
    with pytest.raises(torchstow.StateDictMismatchError, match=r"model\.b: dtype float32") as info:
        torchstow.load(target, ckpt, strict=False)
    assert info.value.missing_keys == ["model.extra"]
    assert target["step"] == 0
    torchstow.load(target, ckpt, strict=False, cast=True)
    assert target["step"] == 40
    assert target["model"]["b"].dtype == torch.float64
    assert torch.equal(target["model"]["b"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(target["model"]["extra"], torch.zeros(1))


def test_shape_mismatch_fails_even_non_strict(ckpt: str, saved: dict[str, Any]) -> None:
    with pytest.raises(torchstow.StateDictMismatchError, match=r"model.w: shape \[2, 3\]"):
        torchstow.load({"model": {"w": torch.zeros(6)}}, ckpt, strict=False)


def test_tensor_versus_object_mismatch(ckpt: str, saved: dict[str, Any]) -> None:
    with pytest.raises(torchstow.StateDictMismatchError, match="step: the checkpoint holds a non-tensor"):
        torchstow.load({"step": torch.zeros(1)}, ckpt, strict=False)


def test_user_metadata_must_be_json(ckpt: str) -> None:
    with pytest.raises(ValueError, match="JSON"):
        torchstow.save({"x": torch.ones(1)}, ckpt, metadata={"when": object()})
    with pytest.raises(TypeError, match="dict"):
        torchstow.save({"x": torch.ones(1)}, ckpt, metadata=[1, 2])  # type: ignore[arg-type]
    assert not os.path.exists(ckpt)


def test_bad_state_dicts_fail_clearly_before_writing(ckpt: str) -> None:
    with pytest.raises(TypeError, match="mapping"):
        torchstow.save([torch.ones(1)], ckpt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        torchstow.load([torch.ones(1)], ckpt)  # type: ignore[arg-type]
    cases = [
        ({"a": {(1, 2): torch.ones(1)}}, r"key \(1, 2\) .* must be str or int"),
        ({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, r"two entries flatten to the key 'a\.b'"),
        ({"m": torch.empty(2, device="meta")}, "meta device"),
    ]
    for state, message in cases:
        with pytest.raises(torchstow.CheckpointException, match=message) as info:
            torchstow.save(state, ckpt)
        assert isinstance(info.value.failures[0][0], ValueError)
    assert not os.path.exists(ckpt) or not os.listdir(ckpt)


def test_bad_uri_and_options(ckpt: str) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        torchstow.save({"x": torch.ones(1)}, "")
    with pytest.raises(TypeError, match="does not take the storage options \\['colour'\\]"):
        torchstow.save({"x": torch.ones(1)}, ckpt, storage_options={"colour": "red"})
    with pytest.raises(ValueError, match="thread_count must be at least 1"):
        torchstow.save({"x": torch.ones(1)}, ckpt, storage_options={"thread_count": 0})
    with pytest.raises(ValueError, match="absolute path"):
        torchstow.save({"x": torch.ones(1)}, "file://relative/dir")


def test_unknown_scheme_lists_installed_ones() -> None:
    with pytest.raises(torchstow.UnknownBackendError) as info:
        torchstow.read("nosuch://bucket/ckpt")
    message = str(info.value)
    assert "'nosuch://bucket/ckpt'" in message
    assert "scheme 'nosuch'" in message
    assert "installed schemes: " in message and "file" in message
    assert isinstance(info.value, ValueError)


def test_local_metadata_does_no_io(tmp_path: Any) -> None:
    md = torchstow.planning.local_metadata({"a": torch.ones(2, 2), "n": 1, "obj": (1, 2)})
    assert md.state_dict_metadata["a"].size == torch.Size([2, 2])
    assert md.state_dict_metadata["n"].encoding == "json"
    assert md.state_dict_metadata["obj"].encoding == "torch"
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_plain_json(ckpt: str, saved: dict[str, Any]) -> None:
    with open(os.path.join(ckpt, "manifest.json"), "rb") as f:
        doc = json.loads(f.read())
    assert doc["format"] == "torchstow"
    assert doc["version"] == 2
    assert doc["user_metadata"] == {"epoch": 3, "tag": "nightly"}
    assert doc["entries"]["model.w"] == {"dtype": "float32", "shape": [2, 3]}
    assert all(name.startswith("data-") for name in doc["files"])
    assert doc["entries"]["step"] == {"encoding": "json", "value": 40}
    # Every location is in the chunk table beside it, named after this commit.
    table = doc["chunk_table"]
    assert table["name"] == f"manifest-{doc['save_id']}.chunks"
    assert os.path.getsize(os.path.join(ckpt, table["name"])) == table["length"]


def test_format_version_1_writes_one_json_document_that_loads(tmp_path: Any, saved: dict[str, Any]) -> None:
    path = str(tmp_path / "v1")
    torchstow.save(saved, path, metadata={"epoch": 3}, format_version=1)
    assert not [name for name in os.listdir(path) if name.endswith(".chunks")]
    with open(os.path.join(path, "manifest.json"), "rb") as f:
        doc = json.loads(f.read())
    assert doc["version"] == 1
    w = doc["entries"]["model.w"]
    assert w["dtype"] == "float32" and w["shape"] == [2, 3]
    assert doc["files"][w["file"]].startswith("data-")
    assert w["length"] == 24 and len(w["crc32c"]) == 1
    assert doc["entries"]["step"] == {"encoding": "json", "value": 40}
    assert torchstow.info(path).format_version == 1
    assert_same_state(torchstow.read(path), saved)
    with pytest.raises(ValueError, match="format_version must be one of 1, 2"):
        torchstow.save(saved, str(tmp_path / "v3"), format_version=3)
