"""Fixtures of the command-line tests: a bucket on the session's moto S3 server."""

from __future__ import annotations

import pytest

from moto_s3 import s3_client


@pytest.fixture(scope="session")
def cli_s3(s3_endpoint: str) -> str:
    """The moto server's URL, once it holds the bucket ``cli-tests``."""
    s3_client(s3_endpoint).create_bucket(Bucket="cli-tests")
    return s3_endpoint
