"""Module paths that plugins and users imported before architecture v2 still give the same objects."""

from __future__ import annotations

import importlib

import pytest

import torchstow
import torchstow.spi

OLD_PATHS = {
    "torchstow.core.store": ["ByteStore", "FileSink", "StorageFullError", "StorageIOError"],
    "torchstow.core.backend": ["Backend", "StoreBackend"],
    "torchstow.core.storage": ["StorageReader", "StorageWriter", "WriteResult"],
    "torchstow.core.metadata": ["Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "MetadataIndex"],
    "torchstow.core.planning": ["DefaultSavePlanner", "DefaultLoadPlanner", "SavePlan", "ReadItem"],
    "torchstow.core.errors": ["CorruptCheckpointError", "CheckpointException", "TorchstowError"],
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_an_old_module_path_still_exports_the_public_names(path: str) -> None:
    module = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        assert getattr(module, name) is getattr(torchstow, name), f"{path}.{name}"


def test_the_old_manifest_codec_still_round_trips() -> None:
    from torchstow.core.metadata import decode_metadata, encode_metadata

    md = torchstow.local_metadata({"n": 3})
    assert decode_metadata(encode_metadata(md)).state_dict_metadata == md.state_dict_metadata


def test_the_plugin_sdk_exports_what_it_lists() -> None:
    assert all(hasattr(torchstow.spi, name) for name in torchstow.spi.__all__)
    assert torchstow.spi.ByteStore is torchstow.ByteStore
    assert torchstow.spi.hookimpl is torchstow.hookimpl
    assert (
        torchstow.spi.ForwardingStorageWriter
        is importlib.import_module("torchstow.core.storage").ForwardingStorageWriter
    )
