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
from torchstow.backends.fsspec.s3 import MAX_PUT, MIN_PART
from torchstow.backends.fsspec.store import THREADS, FsspecStore, Tuning
from torchstow.spi import DirectoryBackend, hookimpl

if TYPE_CHECKING:
    from torchstow.spi import Register

__all__ = ["FsspecBackend"]


class FsspecBackend(DirectoryBackend):
    """Checkpoints on any fsspec filesystem: S3, GCS, Azure, memory, and more.

    Storage options: ``part_size`` (bytes per uploaded part; unset, 16 MiB or more
    as the measured link asks), ``multipart_threshold`` (larger files are multipart
    uploads, default 32 MiB), ``range_size`` (bytes per ranged read; unset, 16 MiB or
    more likewise), ``max_concurrency`` (requests in flight per rank; unset, chosen
    from the link between 8 and 32; fewer while S3 throttles),
    ``stall_timeout`` (seconds without progress before an S3 request is cancelled
    and retried, default 60), ``retry_attempts`` (default 5) and ``retry_delay``
    (first backoff in seconds, default 0.2), ``thread_count`` (data files and
    threads per rank, default 8) and ``verify_checksums``; every other option goes
    to the fsspec filesystem (``endpoint_url``, ``key``, ``secret``,
    ``client_kwargs`` ... for s3fs). See docs/backends.md.
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
        part_size: int | None = None,
        multipart_threshold: int = Tuning.multipart_threshold,
        range_size: int | None = None,
        max_concurrency: int | None = None,
        stall_timeout: float = Tuning.stall_timeout,
        retry_attempts: int = CloudRetryPolicy.attempts,
        retry_delay: float = CloudRetryPolicy.base_delay,
        concurrency: int | None = None,
        **fs_options: Any,
    ) -> None:
        super().__init__(
            thread_count=THREADS if thread_count is None else thread_count, verify_checksums=verify_checksums
        )
        if part_size is not None and not MIN_PART <= part_size <= MAX_PUT:
            raise ValueError(
                f"part_size must be at least {MIN_PART} bytes and at most {MAX_PUT} (S3's limits), "
                f"got {part_size}"
            )
        if not 0 <= multipart_threshold <= MAX_PUT:
            raise ValueError(
                f"multipart_threshold must be 0 to {MAX_PUT} bytes (S3's largest single PUT), "
                f"got {multipart_threshold}"
            )
        if concurrency is not None:  # the option's former name
            max_concurrency = concurrency
        if any(value is not None and value < 1 for value in (range_size, max_concurrency)):
            raise ValueError("range_size and max_concurrency must be positive")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
        # Unset, the sizes and the requests in flight are chosen from the link (see Tuning)
        self.tuning = Tuning(
            Tuning.part_size if part_size is None else part_size,
            multipart_threshold,
            Tuning.range_size if range_size is None else range_size,
            Tuning.concurrency if max_concurrency is None else max_concurrency,
            CloudRetryPolicy(retry_attempts, retry_delay),
            stall_timeout,
            Tuning.start_concurrency if max_concurrency is None else max_concurrency,
            adapt_parts=part_size is None,
            adapt_ranges=range_size is None,
        )
        self.fs_options = fs_options

    def open_store(self, uri: str) -> FsspecStore:
        options = self.fs_options
        if is_s3(filesystem_class(uri)):  # what s3fs does itself (listings, reads) stalls no longer either
            timeouts: dict[str, Any] = {
                "connect_timeout": self.tuning.stall_timeout,
                "read_timeout": self.tuning.stall_timeout,
                # a connection for every request the limit may allow (botocore's pool holds 10)
                "max_pool_connections": self.tuning.concurrency,
            }
            config = {**timeouts, **(options.get("config_kwargs") or {})}
            if config.get("request_checksum_calculation") != "when_required":
                # every body the store sends carries a CRC32C it computes in a writer's thread,
                # which the store checks: botocore signs no SHA-256 of it on the event loop
                # (as it would over plain http), a pass over every byte that proves no more
                config["s3"] = {"payload_signing_enabled": False, **(config.get("s3") or {})}
            options = {**options, "config_kwargs": config}
        fs, path = open_filesystem(uri, options)
        if is_s3(fs) and (not path.strip("/") or uri.partition("://")[2].startswith("/")):  # s3:///x too
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
