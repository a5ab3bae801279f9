"""Nothing left behind on S3: a failed save aborts its multipart uploads, and an upload
whose creation was retried (the first reply lost) leaves no stray upload either."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import torchstow
from torchstow import CheckpointException

from s3_faults import Fault, FaultProxy
from storage_helpers import S3_CREDENTIALS, s3_options, unique


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["key"],
        aws_secret_access_key=S3_CREDENTIALS["secret"],
        region_name="us-east-1",
    )


def uploads_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """The keys of the multipart uploads in progress under ``prefix``."""
    listed = s3_client(endpoint).list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in listed.get("Uploads", [])]


def test_a_failed_save_leaves_no_multipart_upload(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str
) -> None:
    run = unique()
    opts = s3_options(proxy.url, thread_count=2)
    proxy.faults.append(Fault("PUT", r"partNumber=3\b", 403, times=1))  # one file's third part is refused
    with pytest.raises(CheckpointException, match="AccessDenied"):
        torchstow.save(
            {"a": torch.randn(4 << 20), "b": torch.randn(4 << 20)},
            f"s3://{s3_bucket}/{run}/s",
            storage_options=opts,
        )
    assert len(proxy.requests("POST", r"\?uploads")) == 2  # both files were multipart uploads
    assert uploads_under(s3_endpoint, s3_bucket, run) == []


def test_a_lost_create_reply_leaves_no_stray_upload(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str
) -> None:
    run = unique()
    opts = s3_options(proxy.url, thread_count=1)
    sd = {"w": torch.randn(3 << 20)}
    proxy.faults.append(Fault("POST", r"\?uploads", "lost", times=1))  # created on the store, reply lost
    torchstow.save(sd, f"s3://{s3_bucket}/{run}/ok", storage_options=opts)
    assert [r.status for r in proxy.requests("POST", r"\?uploads")] == ["lost", 200]
    assert uploads_under(s3_endpoint, s3_bucket, run) == []
    assert torch.equal(torchstow.read(f"s3://{s3_bucket}/{run}/ok", storage_options=opts)["w"], sd["w"])

    proxy.faults += [
        Fault("POST", r"\?uploads", "lost", times=1),
        Fault("PUT", r"partNumber=2\b", 403, times=1),
    ]
    with pytest.raises(CheckpointException):
        torchstow.save(sd, f"s3://{s3_bucket}/{run}/failed", storage_options=opts)
    assert uploads_under(s3_endpoint, s3_bucket, run) == []
