"""Every built-in backend runs the conformance suite of torchstow.testing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from torchstow.testing import BackendConformance

from storage_helpers import s3_options, unique


class TestFileSystemConformance(BackendConformance):
    scheme = "file"

    @pytest.fixture
    def root_uri(self, tmp_path: Any) -> str:
        return str(tmp_path)  # plain paths, the common spelling of file://


class TestMemoryConformance(BackendConformance):
    scheme = "memory"

    @pytest.fixture
    def root_uri(self) -> Iterator[str]:
        import fsspec

        name = unique("conformance")
        yield f"memory://{name}"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)


class TestShmConformance(BackendConformance):
    scheme = "shm"

    @pytest.fixture
    def root_uri(self) -> str:
        return "shm://run"

    @pytest.fixture
    def storage_options(self, shm_dir: str) -> dict[str, Any]:
        return {"shm_dir": shm_dir}


class TestS3Conformance(BackendConformance):
    scheme = "s3"

    @pytest.fixture
    def root_uri(self, s3_bucket: str) -> str:
        return f"s3://{s3_bucket}/{unique('conformance')}"

    @pytest.fixture
    def storage_options(self, s3_endpoint: str) -> dict[str, Any]:
        return s3_options(s3_endpoint)  # the files of 6 MiB tensors go up in two parts


class TestFaultyConformance(BackendConformance):
    """The fault injector with no fault configured passes every call through."""

    scheme = "faulty+file"

    @pytest.fixture
    def root_uri(self, tmp_path: Any) -> str:
        return f"faulty+file://{tmp_path}"
