"""Every built-in backend runs the conformance kits of torchstow.testing: the byte-store
contract (store backends), end to end, and from several processes (stores that several
processes share)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from torchstow.testing import BackendConformance, ByteStoreConformance, DistributedBackendConformance
from torchstow.testing.distributed import check_distributed_round_trip

from storage_helpers import s3_options, unique


class FileSystem:
    scheme = "file"

    @pytest.fixture
    def root_uri(self, tmp_path: Any) -> str:
        return str(tmp_path)  # plain paths, the common spelling of file://


class TestFileSystemByteStore(FileSystem, ByteStoreConformance):
    pass


class TestFileSystemConformance(FileSystem, BackendConformance):
    pass


@pytest.mark.slow
class TestFileSystemDistributed(FileSystem, DistributedBackendConformance):
    pass


class Memory:
    scheme = "memory"
    exclusive_commits = False  # fsspec's memory filesystem has no exclusive create: check, then write
    shared_between_processes = False  # its files live in this process's memory

    @pytest.fixture
    def root_uri(self) -> Iterator[str]:
        import fsspec

        name = unique("conformance")
        yield f"memory://{name}"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)


class TestMemoryByteStore(Memory, ByteStoreConformance):
    pass


class TestMemoryConformance(Memory, BackendConformance):
    pass


@pytest.mark.slow
def test_the_distributed_kit_fails_a_store_each_process_keeps_to_itself() -> None:
    """memory:// lives in one process's memory: no use for a distributed save, and the
    multi-process kit says so (rather than passing, or hanging)."""
    with pytest.raises(AssertionError, match=r"(?s)failed on 2 ranks.*is missing"):
        check_distributed_round_trip(f"memory://{unique('private')}", {}, timeout=60)


class Shm:
    scheme = "shm"

    @pytest.fixture
    def root_uri(self) -> str:
        return "shm://run"

    @pytest.fixture
    def storage_options(self, shm_dir: str) -> dict[str, Any]:
        return {"shm_dir": shm_dir}


class TestShmByteStore(Shm, ByteStoreConformance):
    pass


class TestShmConformance(Shm, BackendConformance):
    pass


@pytest.mark.slow
class TestShmDistributed(Shm, DistributedBackendConformance):
    pass


class S3:
    scheme = "s3"

    @pytest.fixture
    def root_uri(self, s3_bucket: str) -> str:
        return f"s3://{s3_bucket}/{unique('conformance')}"

    @pytest.fixture
    def storage_options(self, s3_endpoint: str) -> dict[str, Any]:
        return s3_options(s3_endpoint)  # the files of 6 MiB tensors go up in two parts


class TestS3ByteStore(S3, ByteStoreConformance):
    # The store's publish_new is a conditional PUT (If-None-Match: *), exclusive on S3 itself;
    # moto's server checks for the key, then writes, so the kit's forced race sees two winners.
    exclusive_commits = False


class TestS3Conformance(S3, BackendConformance):
    pass


@pytest.mark.slow
class TestS3Distributed(S3, DistributedBackendConformance):
    """Both ranks talk to the moto server of this test process."""


class Faulty:
    """The fault injector with no fault configured passes every call through (it is a
    wrapper, not a byte store: the byte-store kit does not apply)."""

    scheme = "faulty+file"

    @pytest.fixture
    def root_uri(self, tmp_path: Any) -> str:
        return f"faulty+file://{tmp_path}"


class TestFaultyConformance(Faulty, BackendConformance):
    pass


@pytest.mark.slow
class TestFaultyDistributed(Faulty, DistributedBackendConformance):
    pass
