"""The manifest codec's validation: what a damaged or foreign manifest raises."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format.files import is_checkpoint_file, temporary_name


def _rewrite(path: str, change: Any) -> None:
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        doc = json.load(f)
    change(doc)
    with open(manifest, "w") as f:
        json.dump(doc, f)


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    path = str(tmp_path / "ckpt")
    torchstow.save({"w": torch.arange(6.0).reshape(2, 3), "n": 3}, path, format_version=1)  # JSON rewritten
    return path


def test_an_unknown_checksum_algorithm_is_refused_not_reported_as_corruption(ckpt: str) -> None:
    _rewrite(ckpt, lambda doc: doc["checksum"].update(algorithm="sha3"))
    with pytest.raises(torchstow.FormatVersionError, match=r"'sha3'.*knows crc32c"):
        torchstow.read(ckpt)


def test_a_field_of_the_wrong_type_names_where_it_is(ckpt: str) -> None:
    _rewrite(ckpt, lambda doc: doc["entries"]["w"].update(shape="2x3"))
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"malformed.*entries.*shape"):
        torchstow.info(ckpt)


def test_a_location_without_its_length_is_malformed(ckpt: str) -> None:
    _rewrite(ckpt, lambda doc: doc["entries"]["w"].pop("length"))
    with pytest.raises(torchstow.CorruptCheckpointError, match="malformed"):
        torchstow.read(ckpt)


def test_a_version_older_than_any_known_is_a_format_error(ckpt: str) -> None:
    _rewrite(ckpt, lambda doc: doc.update(version=0))
    with pytest.raises(torchstow.FormatVersionError, match="version 0"):
        torchstow.info(ckpt)


def test_publish_debris_counts_as_checkpoint_files() -> None:
    name = temporary_name("manifest.json", "ab12")
    assert is_checkpoint_file(name)
    assert not is_checkpoint_file("notes.txt")
