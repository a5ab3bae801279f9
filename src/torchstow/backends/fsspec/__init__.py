"""The fsspec backend as a plugin: object stores (S3 and others) and any fsspec filesystem."""

from torchstow.backends.fsspec.store import (
    FsspecBackend,
    FsspecStore,
    Tuning,
    open_filesystem,
    torchstow_register_backends,
)

__all__ = ["FsspecBackend", "FsspecStore", "Tuning", "open_filesystem", "torchstow_register_backends"]
