"""Fixtures of the command-line tests: a moto S3 server."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from dist_pool import free_port

from cli_helpers import S3_KEYS


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server (in this process, on 127.0.0.1) with a bucket ``cli-tests``."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEYS["key"],
        aws_secret_access_key=S3_KEYS["secret"],
        region_name="us-east-1",
    ).create_bucket(Bucket="cli-tests")
    try:
        yield endpoint
    finally:
        server.stop()
