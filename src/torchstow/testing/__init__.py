"""Testing helpers shipped with torchstow: the backend conformance suite.

``from torchstow.testing import BackendConformance`` and subclass it in a
pytest module to run every conformance test against a backend (see
:mod:`torchstow.testing.conformance`). Needs pytest, which torchstow itself
does not depend on.
"""

from torchstow.testing.conformance import (
    BackendConformance,
    RegionLoadPlanner,
    assert_same,
    every_dtype_state_dict,
)

__all__ = ["BackendConformance", "RegionLoadPlanner", "assert_same", "every_dtype_state_dict"]
