"""Plans, their items, and the planners: what to write and read, and where it goes.

Also the package's old import path (``torchstow.core.planning``): its public
names are re-exported here.
"""

from torchstow.core.planning.items import (
    BytesWriteData,
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torchstow.core.planning.load_planner import DefaultLoadPlanner
from torchstow.core.planning.planners import LoadPlanner, SavePlanner
from torchstow.core.planning.save_planner import DefaultSavePlanner

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
