"""A checkpoint's manifest as version-1 JSON, whatever version it was written in."""

from __future__ import annotations

import json
import os
from typing import Any

import torchstow
from torchstow.format.codec import encode_metadata


def manifest_doc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The committed manifest at ``path``, decoded (chunk table and all) and shown as the
    version-1 JSON document, where every location sits in its entry."""
    metadata = torchstow.storage_reader(str(path)).read_metadata()
    doc: dict[str, Any] = json.loads(encode_metadata(metadata))
    return doc
