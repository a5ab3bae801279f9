"""On S3 a manifest larger than a reader reads is refused from the GET's Content-Length,
its body never read (the limit lowered here: no test uploads gigabytes); one within the
limit reads in the same single GET."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import torchstow
from moto_s3 import s3_client
from torchstow.backends.fsspec.s3 import S3Requests
from torchstow.core.layout import location
from torchstow.format.files import MANIFEST

from storage_helpers import s3_options, unique


def test_a_manifest_over_the_limit_is_refused_from_its_content_length(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"{unique()}/step-1"
    uri = f"s3://{s3_bucket}/{prefix}"
    opts = s3_options(s3_endpoint)
    torchstow.save({"w": torch.arange(8.0)}, uri, storage_options=opts)
    size = s3_client(s3_endpoint).head_object(Bucket=s3_bucket, Key=f"{prefix}/{MANIFEST}")["ContentLength"]
    answers: list[Any] = []
    read_object = S3Requests.read_object

    def recorded(self: S3Requests, *args: Any, **kwargs: Any) -> bytes | None:
        answers.append(read_object(self, *args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(S3Requests, "read_object", recorded)
    monkeypatch.setattr(location, "MANIFEST_MAX_BYTES", size)
    assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], torch.arange(8.0))
    assert len(answers[0]) == size  # the manifest, at the limit: read in its one GET
    answers.clear()
    monkeypatch.setattr(location, "MANIFEST_MAX_BYTES", size - 1)
    too_large = f"{MANIFEST} holds more than {size - 1:,} bytes"
    with pytest.raises(torchstow.CorruptCheckpointError, match=too_large):
        torchstow.read(uri, storage_options=opts)
    assert answers == [None]  # refused from the reply's Content-Length, the body left unread
