"""Fixtures of the integration tests: a run prefix on the session's moto S3 server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from moto_s3 import MOTO_CREDENTIALS, s3_client


@pytest.fixture
def s3_run(s3_endpoint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(URI of a fresh prefix in a bucket, its torchstow storage options)``; Lightning's own
    fsspec calls on s3:// get the same endpoint and credentials from ``fsspec.config.conf``."""
    import fsspec

    options = {**MOTO_CREDENTIALS, "endpoint_url": s3_endpoint}
    bucket = f"lightning-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    before = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = dict(options)
    try:
        yield f"s3://{bucket}/run", options
    finally:
        if before is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = before
