"""The one partial decode of a manifest (its save id and its chunk table's name, read back
after a failed commit and before reading a root's table): hostile bytes (truncated, the
wrong types, too deep, not UTF-8, another format) yield None for what they spoil, never
an exception, and never a table name that leaves the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format.codec import ManifestPeek, decode_metadata, peek_manifest
from torchstow.format.files import MANIFEST
from torchstow.format.table import TableLocations


def _manifest(tmp_path: Path, version: int) -> bytes:
    where = tmp_path / f"v{version}"
    torchstow.save({"w": torch.arange(64.0), "step": 3}, str(where), format_version=version)
    return (where / MANIFEST).read_bytes()


def test_it_agrees_with_the_full_decoder_on_both_versions(tmp_path: Path) -> None:
    for version in (1, 2):
        data = _manifest(tmp_path, version)
        where = tmp_path / f"v{version}"
        metadata = decode_metadata(data, read_file=lambda n, _, w=where: (w / n).read_bytes())
        locations = metadata.storage_data
        table = locations.table.name if isinstance(locations, TableLocations) else None
        assert peek_manifest(data) == ManifestPeek(metadata.save_id, table)
        assert (table is not None) is (version == 2)


def test_every_truncation_yields_nothing(tmp_path: Path) -> None:
    data = _manifest(tmp_path, 2)
    for end in range(len(data)):
        assert peek_manifest(data[:end]) == ManifestPeek(None, None), end


def _doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads(_manifest(tmp_path, 2))


@pytest.mark.parametrize(
    ("field", "value", "keeps_save_id"),
    [
        ("format", 1, False),
        ("format", "not-torchstow", False),
        ("save_id", 5, False),
        ("save_id", ["a"], False),
        ("version", "2", True),
        ("version", 2.0, True),
        ("version", True, True),
        ("version", 3, True),
        ("chunk_table", "manifest-x.chunks", True),
        ("chunk_table", ["manifest-x.chunks"], True),
        ("chunk_table", {"name": 3}, True),
        ("chunk_table", {"name": "../manifest-x.chunks"}, True),
        ("chunk_table", {"name": "/etc/passwd"}, True),
        ("chunk_table", None, True),
    ],
)
def test_a_field_of_the_wrong_type_spoils_only_what_it_records(
    tmp_path: Path, field: str, value: Any, keeps_save_id: bool
) -> None:
    doc = _doc(tmp_path)
    doc[field] = value
    found = peek_manifest(json.dumps(doc).encode())
    if field == "save_id":
        assert found == ManifestPeek(None, doc["chunk_table"]["name"])
    else:
        assert found.save_id == (doc["save_id"] if keeps_save_id else None)
        assert found.chunk_table is None


def test_a_manifest_without_a_save_id_still_names_its_table(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    del doc["save_id"]
    assert peek_manifest(json.dumps(doc).encode()) == ManifestPeek(None, doc["chunk_table"]["name"])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b"null",
        b'{"format": "torchstow", "save_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"format": "torchstow", "version": 2, "chunk_table": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["empty", "not-json", "not-utf8", "array", "null", "deep-save-id", "deep-table"],
)
def test_bytes_that_are_no_manifest_yield_nothing(data: bytes) -> None:
    found = peek_manifest(data)
    assert found.chunk_table is None and found.save_id is None
