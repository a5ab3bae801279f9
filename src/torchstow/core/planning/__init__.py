"""Plans, their items, and the planners: what to write and read, and where it goes.

Also the package's old import path (``torchstow.core.planning``): its public
names are re-exported here.
"""

from torchstow.core.planning.save_planner import (
    BytesWriteData,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = [
    "BytesWriteData",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
]
