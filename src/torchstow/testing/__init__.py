"""Testing helpers shipped with torchstow: the conformance kits for backends.

Four kits, each an abstract pytest class to subclass in one line:

- :class:`ByteStoreConformance` calls a :class:`~torchstow.spi.ByteStore` directly
  and checks its contract (missing files, short reads, atomic publish, an
  exclusive ``publish_new`` under a forced race, concurrent writers, listing and
  deleting, another process's view, a child forked after use).
- :class:`BackendConformance` saves, loads, lists, damages and deletes
  checkpoints end to end through the backend's scheme.
- :class:`DistributedBackendConformance` saves and loads one checkpoint from
  two gloo processes, each opening the same location itself.
- :class:`WrapperConformance` checks a byte-level wrapper (``enc+file``) against the
  backend it wraps: bytes at rest match its ``transforms_bytes``, no capability leaks,
  tuning inherited, ``faulty+`` composes.

:func:`assert_same_state` compares nested state dicts bit for bit. The kits
need pytest, which torchstow itself does not depend on. A kit failure names the
rule that was broken and how to fix it.
"""

from torchstow.testing.backend import BackendConformance
from torchstow.testing.byte_store import ByteStoreConformance
from torchstow.testing.compare import assert_same_state, state_differences
from torchstow.testing.distributed import DistributedBackendConformance
from torchstow.testing.ranks import run_ranks
from torchstow.testing.region_planner import RegionLoadPlanner
from torchstow.testing.states import every_dtype_state_dict, zeros_like_state
from torchstow.testing.wrapper import WrapperConformance

assert_same = assert_same_state  # the name before the kit was split

__all__ = [
    "BackendConformance",
    "ByteStoreConformance",
    "DistributedBackendConformance",
    "RegionLoadPlanner",
    "WrapperConformance",
    "assert_same",
    "assert_same_state",
    "every_dtype_state_dict",
    "run_ranks",
    "state_differences",
    "zeros_like_state",
]
