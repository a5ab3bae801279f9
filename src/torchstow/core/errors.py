"""Deprecated import path: the errors live in :mod:`torchstow.errors` (see docs/architecture.md)."""

from torchstow.errors import *  # noqa: F403
from torchstow.errors import __all__ as __all__
