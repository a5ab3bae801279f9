"""Fixtures of the command-line tests: a bucket on the session's moto S3 server."""

from __future__ import annotations

import pytest

from cli_helpers import S3_KEYS


@pytest.fixture(scope="session")
def cli_s3(s3_endpoint: str) -> str:
    """The moto server's URL, once it holds the bucket ``cli-tests``."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=S3_KEYS["key"],
        aws_secret_access_key=S3_KEYS["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket="cli-tests")
    return s3_endpoint
