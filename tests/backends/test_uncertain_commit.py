"""A manifest write whose outcome is unknown (the store took it, the reply was lost, the
retries failed) is resolved by reading the manifest back: this save's id means committed."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import torch

import torchstow

from s3_faults import Fault, FaultProxy
from storage_helpers import s3_options, unique


def state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64, 8), value), "step": int(value)}


def files_of(uri: str, opts: dict[str, Any]) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(key=opts["key"], secret=opts["secret"], endpoint_url=opts["endpoint_url"])
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(uri.removeprefix("s3://"), refresh=True))


def manifest_of(uri: str, opts: dict[str, Any]) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem(key=opts["key"], secret=opts["secret"], endpoint_url=opts["endpoint_url"])
    doc: dict[str, Any] = json.loads(fs.cat_file(uri.removeprefix("s3://") + "/manifest.json"))
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_lost_reply_then_failing_retries_still_commits(
    proxy: FaultProxy, s3_bucket: str, overwrite: bool, caplog: Any
) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, retry_attempts=3)
    if overwrite:
        torchstow.save(state(1.0), uri, storage_options=opts)
    old_files = set(files_of(uri, opts)) - {"manifest.json"} if overwrite else set()
    proxy.log.clear()
    # The store accepts the manifest but the reply never arrives; every retry then gets 503.
    proxy.faults.append(Fault("PUT", r"manifest\.json", "lost", times=1))
    proxy.faults.append(Fault("PUT", r"manifest\.json", 503))
    with caplog.at_level(logging.WARNING, logger="torchstow"):
        torchstow.save(state(2.0), uri, storage_options=opts, overwrite=overwrite)
    assert "reading it back shows this save committed" in caplog.text
    statuses = [r.status for r in proxy.requests("PUT", r"manifest\.json")]
    assert statuses[0] == "lost" and set(statuses[1:]) == {503}, statuses
    got = torchstow.read(uri, storage_options=opts)
    assert torch.equal(got["w"], torch.full((64, 8), 2.0)) and got["step"] == 2
    assert torchstow.latest(uri.rsplit("/", 1)[0], storage_options=opts) == uri
    # The data the committed manifest lists is all there; the replaced checkpoint's is gone.
    listed = set(manifest_of(uri, opts)["files"])
    assert listed <= set(files_of(uri, opts))
    assert not old_files & set(files_of(uri, opts))


def test_a_lost_reply_retried_as_a_conditional_write_meets_itself(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url)
    proxy.faults.append(Fault("PUT", r"manifest\.json", "lost", times=1))
    torchstow.save(state(3.0), uri, storage_options=opts)  # the retry gets 412: its own first attempt
    statuses = [r.status for r in proxy.requests("PUT", r"manifest\.json")]
    assert statuses[0] == "lost" and statuses[-1] == 412, statuses
    assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], torch.full((64, 8), 3.0))


def test_a_manifest_write_that_never_landed_fails_and_removes_only_its_own_files(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, retry_attempts=2)
    torchstow.save(state(1.0), uri, storage_options=opts)
    before = files_of(uri, opts)
    proxy.faults.append(Fault("PUT", r"manifest\.json", 503))
    with pytest.raises(torchstow.StorageIOError, match=r"manifest\.json"):
        torchstow.save(state(2.0), uri, storage_options=opts, overwrite=True)
    assert files_of(uri, opts) == before  # the old checkpoint whole, the failed save's files gone
    assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], torch.full((64, 8), 1.0))
