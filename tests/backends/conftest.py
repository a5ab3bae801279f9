"""Fixtures of the backend tests: a bucket on the session's moto S3 server, a fault proxy in front
of it, a fresh plugin registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moto_s3 import s3_client
from torchstow.plugins.manager import reset_default_registry

from s3_faults import FaultProxy


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A bucket on the moto server."""
    name = "torchstow-tests"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server, closed after the test."""
    proxy = FaultProxy(s3_endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Rebuild the plugin registry before and after a test that changes what is installed."""
    reset_default_registry()
    try:
        yield
    finally:
        reset_default_registry()
