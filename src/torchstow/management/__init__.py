"""Living with checkpoints: verify, copy, prune, list, and a manager for a training loop."""

from torchstow.management.copy import RunCopy, copy, copy_run
from torchstow.management.datafiles import Problem
from torchstow.management.gc import GcReport, gc
from torchstow.management.listing import Entry, scan
from torchstow.management.manager import CheckpointManager
from torchstow.management.prune import prune
from torchstow.management.steps import step_of
from torchstow.management.verify import VerifyReport, verify

__all__ = [
    "CheckpointManager",
    "Entry",
    "GcReport",
    "Problem",
    "RunCopy",
    "VerifyReport",
    "copy",
    "copy_run",
    "gc",
    "prune",
    "scan",
    "step_of",
    "verify",
]
