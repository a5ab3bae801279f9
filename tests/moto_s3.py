"""The session's moto S3 server (the ``s3_endpoint`` fixture) as a client sees it: the
credentials it accepts and a boto3 client for it."""

from __future__ import annotations

from typing import Any

__all__ = ["MOTO_CREDENTIALS", "s3_client"]

#: What the moto server accepts, as torchstow storage options (``key``, ``secret``).
MOTO_CREDENTIALS = {"key": "testing", "secret": "testing"}


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server at ``endpoint``."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=MOTO_CREDENTIALS["key"],
        aws_secret_access_key=MOTO_CREDENTIALS["secret"],
        region_name="us-east-1",
    )
