"""Deprecated import path: the manifest lives in :mod:`torchstow.format.manifest` and its
codec in :mod:`torchstow.format.codec` (see docs/architecture.md)."""

from torchstow.format.codec import FORMAT_NAME as FORMAT_NAME
from torchstow.format.codec import decode_metadata as decode_metadata
from torchstow.format.codec import encode_metadata as encode_metadata
from torchstow.format.manifest import *  # noqa: F403
from torchstow.format.manifest import __all__ as _manifest_all

__all__ = [*_manifest_all, "FORMAT_NAME", "decode_metadata", "encode_metadata"]
