"""Deprecated import path: backends live in :mod:`torchstow.core.storage.backend`
(plugin authors: import from :mod:`torchstow.spi`; see docs/architecture.md)."""

from torchstow.core.storage.backend import Backend as Backend
from torchstow.core.storage.backend import StoreBackend as StoreBackend

__all__ = ["Backend", "StoreBackend"]
