"""The planner author's namespace: plans, their items, the planners, and the
metadata they describe a checkpoint with (DCP's names, torchstow's objects).

Subclass :class:`DefaultSavePlanner`/:class:`DefaultLoadPlanner` (or
:class:`SavePlanner`/:class:`LoadPlanner`) and pass an instance as ``planner=``
to :func:`torchstow.save`/:func:`torchstow.load`; ``docs/architecture.md``
says where each phase runs.
"""

from collections.abc import Mapping
from typing import Any

from torchstow.core.planning import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torchstow.format.manifest import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

__all__ = [
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "Metadata",
    "MetadataIndex",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "TensorProperties",
    "TensorStorageMetadata",
    "WriteItem",
    "WriteItemType",
    "local_metadata",
]


def local_metadata(state_dict: Mapping[str, Any], *, allow_pickle: bool = False) -> Metadata:
    """The metadata a single-process save of ``state_dict`` would commit (no I/O)."""
    planner = DefaultSavePlanner(allow_pickle=allow_pickle)
    planner.set_up_planner(state_dict, None, True)
    _, metadata = planner.create_global_plan([planner.create_local_plan()])
    return metadata
