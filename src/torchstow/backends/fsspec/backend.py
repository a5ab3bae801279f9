"""The fsspec backend class: its schemes, storage options and stores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchstow.backends.fsspec.errors import CloudRetryPolicy
from torchstow.backends.fsspec.filesystems import (
    filesystem_class,
    filesystem_options,
    is_s3,
    open_filesystem,
)
from torchstow.backends.fsspec.s3 import MIN_PART
from torchstow.backends.fsspec.store import THREADS, FsspecStore, Tuning
from torchstow.spi import DirectoryBackend, hookimpl

if TYPE_CHECKING:
    from torchstow.spi import Register

__all__ = ["FsspecBackend"]


class FsspecBackend(DirectoryBackend):
    """Checkpoints on any fsspec filesystem: S3, GCS, Azure, memory, and more.

    Storage options: ``part_size`` (bytes per uploaded part, default 16 MiB),
    ``multipart_threshold`` (larger files are multipart uploads, default
    32 MiB), ``range_size`` (bytes per ranged read, default 32 MiB), ``concurrency``
    (requests in flight per rank and direction, default 8),
    ``retry_attempts`` (default 5) and ``retry_delay`` (first backoff in
    seconds, default 0.2), ``thread_count`` (data files and threads per rank,
    default 8) and ``verify_checksums``; every
    other option goes to the fsspec filesystem (``endpoint_url``, ``key``,
    ``secret``, ``client_kwargs`` ... for s3fs).
    """

    schemes = (
        "s3",
        "s3a",
        "gs",
        "gcs",
        "az",
        "abfs",
        "abfss",
        "adl",
        "oss",
        "hdfs",
        "webhdfs",
        "sftp",
        "memory",
        "fsspec",
    )

    def __init__(
        self,
        *,
        thread_count: int | None = None,
        verify_checksums: bool = True,
        part_size: int = Tuning.part_size,
        multipart_threshold: int = Tuning.multipart_threshold,
        range_size: int = Tuning.range_size,
        concurrency: int = Tuning.concurrency,
        retry_attempts: int = CloudRetryPolicy.attempts,
        retry_delay: float = CloudRetryPolicy.base_delay,
        **fs_options: Any,
    ) -> None:
        super().__init__(
            thread_count=THREADS if thread_count is None else thread_count, verify_checksums=verify_checksums
        )
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum), got {part_size}")
        if range_size < 1 or concurrency < 1:
            raise ValueError("range_size and concurrency must be positive")
        self.tuning = Tuning(
            part_size,
            multipart_threshold,
            range_size,
            concurrency,
            CloudRetryPolicy(retry_attempts, retry_delay),
        )
        self.fs_options = fs_options

    def open_store(self, uri: str) -> FsspecStore:
        fs, path = open_filesystem(uri, self.fs_options)
        if is_s3(fs) and not path.strip("/"):
            raise ValueError(f"{uri!r} names no bucket: write {uri.split(':', 1)[0]}://BUCKET/PREFIX")
        return FsspecStore(fs, path, uri.rstrip("/"), self.tuning)

    @classmethod
    def extra_storage_options(cls, uri: str) -> list[str]:
        """The options the fsspec filesystem for ``uri`` names in its constructors."""
        return filesystem_options(filesystem_class(uri))

    def child_names(self, prefix: str) -> list[str]:
        """The directories under ``prefix``; CheckpointNotFoundError when its bucket does not exist
        (a wrong name, which an empty listing would hide)."""
        listed = self.open_store(prefix)._list(bucket_must_exist=True)
        return [name for name, kind, _ in listed if kind == "directory"]


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the fsspec backend for object stores and other fsspec filesystems."""
    register(FsspecBackend)
