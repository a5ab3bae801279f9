"""Helpers of the hostile-input tests: a real checkpoint, and ways to rewrite its manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import crc32c
import torch

import torchstow


def original() -> dict[str, Any]:
    """The state dict every hostile-input test starts from."""
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "opt": {"step": 3, "betas": (0.9, 0.99), "m": [torch.ones(2, dtype=torch.int64)]},
    }


def zeros_like_original() -> dict[str, Any]:
    """A load target shaped like :func:`original`, holding other values."""
    return {
        "w": torch.zeros(4, 3),
        "opt": {"step": 0, "betas": (0.0, 0.0), "m": [torch.zeros(2, dtype=torch.int64)]},
    }


def save_original(path: str) -> str:
    """A version-1 checkpoint: these tests rewrite its JSON, which holds every location
    (version-2 chunk tables have hostile-input tests of their own)."""
    torchstow.save(original(), path, format_version=1)
    return path


def manifest_path(path: str) -> str:
    return os.path.join(path, "manifest.json")


def read_manifest(path: str) -> dict[str, Any]:
    with open(manifest_path(path)) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def write_manifest(path: str, doc: Any) -> None:
    write_bytes(path, json.dumps(doc).encode())


def write_bytes(path: str, data: bytes) -> None:
    with open(manifest_path(path), "wb") as f:
        f.write(data)


def tamper(path: str, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the manifest at ``path`` with ``change`` applied to it in place."""
    doc = read_manifest(path)
    change(doc)
    write_manifest(path, doc)


def stored_bytes(path: str, entry: dict[str, Any], files: list[str]) -> bytes:
    """The bytes a whole-tensor entry's location holds."""
    with open(os.path.join(path, files[entry["file"]]), "rb") as f:
        f.seek(entry["offset"])
        return f.read(entry["length"])


def crc(data: bytes) -> int:
    return int(crc32c.crc32c(data))


def as_row_chunks(path: str, doc: dict[str, Any], cuts: list[tuple[int, int]]) -> None:
    """Turn the whole entry ``w`` (4 x 3 float32) into chunks of rows ``[start, end)``
    pointing at the same bytes, each with a correct checksum."""
    entry = doc["entries"]["w"]
    data = stored_bytes(path, entry, doc["files"])
    row = 3 * 4
    chunks = []
    for start, end in cuts:
        piece = data[start * row : end * row]
        chunks.append(
            {
                "offsets": [start, 0],
                "sizes": [end - start, 3],
                "file": entry["file"],
                "offset": entry["offset"] + start * row,
                "length": len(piece),
                "crc32c": [crc(piece)] if piece else [],
            }
        )
    for key in ("file", "offset", "length", "crc32c"):
        del entry[key]
    entry["chunks"] = chunks


def tensor_bytes_of(tree: Any) -> list[bytes]:
    """The raw bytes of every tensor in a nested state dict."""
    out: list[bytes] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            out.append(node.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return out
