"""Fixtures of the backend tests: a bucket on the session's moto S3 server, a fault proxy in front
of it, a fresh plugin registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from torchstow.plugins.manager import reset_default_registry

from s3_faults import FaultProxy
from storage_helpers import S3_CREDENTIALS


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A bucket on the moto server."""
    import boto3

    name = "torchstow-tests"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_CREDENTIALS["key"],
        aws_secret_access_key=S3_CREDENTIALS["secret"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
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
