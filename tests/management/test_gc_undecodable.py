"""gc pointed at a checkpoint (not only at a prefix of them) leaves every file of one whose
manifest is there but does not decode: what it names is unknown, so none of it is debris."""

from __future__ import annotations

from pathlib import Path

import torch

import torchstow
from torchstow.format.files import MANIFEST


def test_gc_at_a_checkpoint_whose_manifest_does_not_decode_removes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    torchstow.save({"w": torch.arange(8.0)}, path)
    (path / MANIFEST).write_bytes(b'{"format": "torchstow", "version": 2, "entries": {')
    before = sorted(p.name for p in path.iterdir())
    for where in (tmp_path, path):
        report = torchstow.gc(str(where), older_than=0)
        assert report.removed == [] and "could not be read" in report.skipped[str(path)], report
    assert sorted(p.name for p in path.iterdir()) == before
