"""The names this module held before the kit was split, kept importable.

New code imports from :mod:`torchstow.testing`. ``assert_same`` is the old
name of :func:`torchstow.testing.assert_same_state`.
"""

from torchstow.testing.backend import BackendConformance
from torchstow.testing.compare import assert_same_state as assert_same
from torchstow.testing.region_planner import RegionLoadPlanner
from torchstow.testing.states import every_dtype_state_dict

__all__ = ["BackendConformance", "RegionLoadPlanner", "assert_same", "every_dtype_state_dict"]
