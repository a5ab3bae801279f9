"""Read chosen keys of a checkpoint into memory, in this process alone.

:func:`materialize` is the one "allocate, load, hand back" step under
``torchstow.read``, :meth:`torchstow.CheckpointReader.read` and the sources
``convert`` reads from. Its cost is the keys asked for: the reader keeps what
it learnt about the data files (one listing) for the metadata it was given,
so a caller reading a checkpoint key by key passes the same reader each time
and a conversion stays linear in the number of tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchstow.core.layout.reader import require_data
from torchstow.core.planning import DefaultLoadPlanner
from torchstow.core.protocol.steps import load_state_dict
from torchstow.core.storage.interfaces import StorageReader
from torchstow.format.manifest import Metadata, TensorStorageMetadata

__all__ = ["materialize"]


def materialize(
    reader: StorageReader,
    metadata: Metadata,
    wanted: Mapping[str, Any],
    *,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """The values of the stored keys ``wanted`` names, loaded through ``reader``.

    ``wanted`` maps each key to what to load it into: a tensor or DTensor is
    filled in place, ``None`` gets a new CPU tensor of the stored dtype and
    shape (or the stored value, for a non-tensor). A key in a missing data
    file raises CorruptCheckpointError before anything is allocated. Returns
    the flat dict loaded (the nesting is :func:`~torchstow.format.structure.build_nested`'s).
    """
    require_data(reader, metadata, wanted)  # before allocating what the manifest claims
    entries = metadata.state_dict_metadata
    flat: dict[str, Any] = {}
    for key, value in wanted.items():
        entry = entries[key]
        if value is None and isinstance(entry, TensorStorageMetadata):
            value = torch.empty(entry.size, dtype=entry.properties.dtype)
        flat[key] = value
    load_state_dict(
        flat, reader, planner=DefaultLoadPlanner(strict=False, allow_pickle=allow_pickle), metadata=metadata
    )
    return flat
