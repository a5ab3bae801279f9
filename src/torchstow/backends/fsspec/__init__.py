"""The fsspec backend as a plugin: object stores (S3 and others) and any fsspec filesystem.

``backend`` holds the backend class, ``store`` the byte store, ``s3`` what it
does itself on S3, ``filesystems`` how a URI finds its fsspec filesystem.
"""

from torchstow.backends.fsspec.backend import FsspecBackend, torchstow_register_backends
from torchstow.backends.fsspec.filesystems import open_filesystem
from torchstow.backends.fsspec.store import FsspecStore, Tuning

__all__ = ["FsspecBackend", "FsspecStore", "Tuning", "open_filesystem", "torchstow_register_backends"]
