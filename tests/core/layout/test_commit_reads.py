"""What finding a committed manifest's files costs: the manifest and its chunk table read
once each from the store, and the manifest's JSON parsed no more than decoding needs."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

import torchstow
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout.commit import is_committed, landed, listed_files, publish_manifest
from torchstow.format import codec
from torchstow.format.codec import decode_metadata
from torchstow.format.files import MANIFEST
from torchstow.testing.counting import CountingStore, bytes_read, read_calls


def test_listing_a_committed_manifests_files_reads_and_parses_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torchstow.save({"w": torch.randn(64), "step": 3}, str(tmp_path))
    on_disk = {name: (tmp_path / name).stat().st_size for name in os.listdir(tmp_path)}
    manifest = (tmp_path / MANIFEST).read_bytes()
    parses: list[str] = []  # each pass over the manifest's JSON, by what it decoded
    decode, document = msgspec.json.decode, codec._v2_decoder

    def counted(data: Any, *args: Any, **kwargs: Any) -> Any:
        if bytes(data) == manifest:
            parses.append(kwargs["type"].__name__)
        return decode(data, *args, **kwargs)

    class CountedDocument:
        def decode(self, data: Any) -> Any:
            parses.append("document")
            return document.decode(data)

    monkeypatch.setattr(msgspec.json, "decode", counted)
    monkeypatch.setattr(codec, "_v2_decoder", CountedDocument())
    store = CountingStore(LocalFileStore(str(tmp_path), str(tmp_path)))
    calls, nbytes = read_calls(), bytes_read()
    listed = listed_files(store)
    assert listed == set(on_disk) - {MANIFEST}  # the data file and the chunk table
    table = next(n for n in listed if n.endswith(".chunks"))
    assert read_calls() - calls == 2  # the manifest and its table, once each
    assert bytes_read() - nbytes == on_disk[MANIFEST] + on_disk[table]
    assert parses == ["Header", "document"]  # not a third pass for the chunk table's name


def test_reading_a_commit_back_reads_only_the_manifest_and_refuses_another_saves(tmp_path: Path) -> None:
    """A failed publish reads the location back to see whether the manifest there is this
    save's: the manifest alone (its save id), not its chunk table; another save's, or no
    torchstow manifest, is not."""
    torchstow.save({"w": torch.randn(64), "step": 3}, str(tmp_path))  # another save committed first
    manifest = (tmp_path / MANIFEST).read_bytes()
    theirs, table = codec.peek_manifest(manifest)
    assert theirs and table  # version 2: its table is a file of its own
    ours = decode_metadata(manifest, read_file=lambda n, _: (tmp_path / n).read_bytes())
    ours.save_id = uuid.uuid4().hex
    store = CountingStore(LocalFileStore(str(tmp_path), str(tmp_path)))
    calls, nbytes = read_calls(), bytes_read()
    with pytest.raises(torchstow.CheckpointExistsError, match="another save committed"):
        publish_manifest(store, ours, overwrite=False)  # the exclusive write fails: read back
    assert read_calls() - calls == 1 and bytes_read() - nbytes == len(manifest)
    assert (tmp_path / MANIFEST).read_bytes() == manifest
    assert is_committed(store, theirs) and landed(store, theirs)
    assert not is_committed(store, ours.save_id) and landed(store, ours.save_id) is None
    foreign = json.dumps({"format": "not-torchstow", "save_id": ours.save_id}).encode()
    for other in (foreign, b"not json", json.dumps({"save_id": ours.save_id}).encode()):
        (tmp_path / MANIFEST).write_bytes(other)
        assert not is_committed(store, ours.save_id)
    (tmp_path / MANIFEST).unlink()
    assert not is_committed(store, ours.save_id)
