"""Nothing left behind on S3: a failed save aborts its multipart uploads, an upload
whose creation was retried, interrupted by a signal handler or failed after the store
acted on it (a reply lost) leaves no stray upload either, and a single PUT or a part
interrupted by a signal handler lands, if at all, before the save's cleanup."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchstow
from moto_s3 import s3_client
from torchstow import CheckpointException
from torchstow.backends.fsspec.s3 import S3Requests

from s3_faults import Fault, FaultProxy
from storage_helpers import s3_options, unique
from waits import wait_until


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


def test_gc_on_s3_removes_old_debris_and_aborts_orphaned_uploads(s3_endpoint: str, s3_bucket: str) -> None:
    run = unique()
    prefix = f"s3://{s3_bucket}/{run}"
    opts = s3_options(s3_endpoint)
    sd = {"w": torch.randn(1000)}
    torchstow.save(sd, f"{prefix}/step-1", storage_options=opts)
    client = s3_client(s3_endpoint)
    # what killed saves left: an object beside a committed checkpoint, an incomplete
    # checkpoint, and a multipart upload nobody completed (under a location with no object),
    # dated by its part (moto dates every upload's start in 2010)
    client.put_object(Bucket=s3_bucket, Key=f"{run}/step-1/data-aaaaaaaaaaaa-0-0.bin", Body=b"x" * 100)
    client.put_object(Bucket=s3_bucket, Key=f"{run}/step-2/data-bbbbbbbbbbbb-0-0.bin", Body=b"x" * 100)
    orphan = f"{run}/step-3/data-cccccccccccc-0-0.bin"
    # and another program's upload under the prefix, which gc must never abort
    theirs = f"{run}/exports/model.safetensors"
    for key in (orphan, theirs):
        upload = client.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
        client.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"y" * 100)

    young = torchstow.gc(prefix, storage_options=opts)  # the default grace period: an hour
    assert young.removed == [] and young.aborted == []
    assert sorted(young.kept) == sorted(
        [
            f"{prefix}/step-1/data-aaaaaaaaaaaa-0-0.bin",
            f"{prefix}/step-2/data-bbbbbbbbbbbb-0-0.bin",
            f"s3://{s3_bucket}/{orphan}",
        ]
    )
    assert sorted(uploads_under(s3_endpoint, s3_bucket, run)) == [theirs, orphan]

    time.sleep(1.1)  # S3 dates objects and uploads to the second
    report = torchstow.gc(prefix, older_than=0, storage_options=opts)
    assert sorted(report.removed) == [
        f"{prefix}/step-1/data-aaaaaaaaaaaa-0-0.bin",
        f"{prefix}/step-2/data-bbbbbbbbbbbb-0-0.bin",
    ]
    assert report.aborted == [f"s3://{s3_bucket}/{orphan}"]
    assert f"s3://{s3_bucket}/{theirs}" in report.skipped
    assert uploads_under(s3_endpoint, s3_bucket, run) == [theirs]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=run).get("Contents", [])]
    assert len(keys) == 3 and all(k.startswith(f"{run}/step-1/") for k in keys)  # manifest, table, data
    assert torch.equal(torchstow.read(f"{prefix}/step-1", storage_options=opts)["w"], sd["w"])


def test_gc_leaves_an_s3_save_in_flight_alone(proxy: FaultProxy, s3_endpoint: str, s3_bucket: str) -> None:
    run = unique()
    prefix = f"s3://{s3_bucket}/{run}"
    opts = s3_options(proxy.url, thread_count=1)
    sd = {"w": torch.randn(3 << 20)}  # 12 MiB: three parts; the last one held up for a while
    proxy.faults.append(Fault("PUT", r"partNumber=3\b", "delay", delay=4.0))
    saving = threading.Thread(
        target=torchstow.save, args=(sd, f"{prefix}/step-1"), kwargs={"storage_options": opts}
    )
    saving.start()
    try:
        client, deadline = s3_client(s3_endpoint), time.monotonic() + 60
        while not any(  # wait until the upload is under way: a part of it has landed
            client.list_parts(Bucket=s3_bucket, Key=key, UploadId=u["UploadId"]).get("Parts")
            for u in client.list_multipart_uploads(Bucket=s3_bucket, Prefix=run).get("Uploads", [])
            for key in [u["Key"]]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        report = torchstow.gc(prefix, older_than=60, storage_options=s3_options(s3_endpoint))
        assert report.aborted == [] and report.removed == []
        assert (
            len(report.kept) == 1
        )  # the upload in flight: its parts are recent (moto dates its start in 2010)
    finally:
        saving.join(60)
    assert torch.equal(torchstow.read(f"{prefix}/step-1", storage_options=opts)["w"], sd["w"])


class _PreemptedError(Exception):
    """What the test's SIGALRM handler raises to stop a save."""


def test_a_single_put_interrupted_by_a_signal_handler_leaves_no_data_file(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save's one data file, small enough for a single PUT, is being written from the main
    thread when a signal handler raises there (SIGTERM's to stop training, say); the PUT is
    already on its way (the proxy holds it half a second). The failed save's cleanup must come
    after it: before, the cleanup deleted nothing yet written, and then the PUT landed, a data
    file that no manifest names."""
    run = unique()
    proxy.faults.append(Fault("PUT", r"/data-", "delay", delay=0.5, times=1))
    _save_interrupted_as_sent(
        monkeypatch,
        lambda method, kwargs: method == "put_object" and "/data-" in kwargs["Key"],
        torch.randn(1 << 16),
        f"s3://{s3_bucket}/{run}/s",
        s3_options(proxy.url, thread_count=1),
    )
    wait_until(lambda: proxy.requests("PUT", r"/data-") != [], what="the data file's PUT to end")
    assert [r.status for r in proxy.requests("PUT", r"/data-")] == [200]  # it landed, once
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix=run).get("Contents", [])
    assert [o["Key"] for o in listed] == []


def test_a_single_put_sent_just_before_a_handler_raised_leaves_no_data_file(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest window of the case above: the handler raises after the PUT was handed to
    the event loop but before the call that sent it returned (so the sink never saw what it
    returns). The cleanup must still wait for the PUT, which the proxy holds half a second."""
    run = unique()
    proxy.faults.append(Fault("PUT", r"/data-", "delay", delay=0.5, times=1))
    _raise_after_hand_over(monkeypatch, "send_put")
    with pytest.raises((CheckpointException, _PreemptedError)):
        torchstow.save(
            {"w": torch.randn(1 << 16)},
            f"s3://{s3_bucket}/{run}/s",
            storage_options=s3_options(proxy.url, thread_count=1),
        )
    wait_until(lambda: proxy.requests("PUT", r"/data-") != [], what="the data file's PUT to end")
    listed = s3_client(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix=run).get("Contents", [])
    assert [o["Key"] for o in listed] == []


def test_gc_keeps_the_landed_files_of_a_save_still_uploading_one(s3_endpoint: str, s3_bucket: str) -> None:
    # a save (or copy) whose first file landed long ago and whose last is still uploading
    # is in flight: its landed file is no debris while the upload gains parts
    run = unique()
    prefix = f"s3://{s3_bucket}/{run}"
    client = s3_client(s3_endpoint)
    landed, uploading = (f"{run}/step-1/data-aaaaaaaaaaaa-{n}-0.bin" for n in (0, 1))
    client.put_object(Bucket=s3_bucket, Key=landed, Body=b"x" * 100)
    time.sleep(2.1)  # S3 dates objects and parts to the second
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key=uploading)["UploadId"]
    client.upload_part(Bucket=s3_bucket, Key=uploading, UploadId=upload, PartNumber=1, Body=b"y" * 100)
    landed_at = client.head_object(Bucket=s3_bucket, Key=landed)["LastModified"].timestamp()
    (part,) = client.list_parts(Bucket=s3_bucket, Key=uploading, UploadId=upload)["Parts"]
    between = (landed_at + part["LastModified"].timestamp()) / 2  # a second or more from either
    report = torchstow.gc(prefix, older_than=time.time() - between, storage_options=s3_options(s3_endpoint))
    assert report.removed == [] and report.aborted == []
    assert sorted(report.kept) == [f"s3://{s3_bucket}/{landed}", f"s3://{s3_bucket}/{uploading}"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=run).get("Contents", [])]
    assert keys == [landed]


def test_a_create_interrupted_by_a_signal_handler_leaves_no_upload(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save's one data file, a multipart upload, is started from the main thread when a
    signal handler raises there, the request that creates the upload already on its way (the
    proxy holds it half a second): S3 creates the upload, the sink never learns its id. The
    failed save's cleanup must still abort it; before, it was left pending (storage billed
    until gc or a lifecycle rule removed it)."""
    run = unique()
    proxy.faults.append(Fault("POST", r"\?uploads", "delay", delay=0.5, times=1))
    _save_interrupted_as_sent(
        monkeypatch,
        lambda method, kwargs: method == "create_multipart_upload",
        torch.randn(3 << 20),
        f"s3://{s3_bucket}/{run}/s",
        s3_options(proxy.url, thread_count=1),
    )
    wait_until(lambda: proxy.requests("POST", r"\?uploads") != [], what="the create request to end")
    assert [r.status for r in proxy.requests("POST", r"\?uploads")] == [200]  # S3 created the upload
    assert uploads_under(s3_endpoint, s3_bucket, run) == []


def test_a_create_whose_only_reply_was_lost_leaves_no_upload(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str
) -> None:
    """The connection fails after S3 created the upload, on the last attempt the policy allows
    (here the only one): the save fails, and its cleanup must find the upload by listing."""
    run = unique()
    opts = s3_options(proxy.url, thread_count=1, retry_attempts=1)
    proxy.faults.append(Fault("POST", r"\?uploads", "lost", times=1))
    with pytest.raises(CheckpointException):
        torchstow.save({"w": torch.randn(3 << 20)}, f"s3://{s3_bucket}/{run}/s", storage_options=opts)
    assert [r.status for r in proxy.requests("POST", r"\?uploads")] == ["lost"]
    assert uploads_under(s3_endpoint, s3_bucket, run) == []


def test_a_part_started_just_before_a_handler_raised_is_stopped_by_the_cleanup(
    proxy: FaultProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler raises after a part's upload was handed to the event loop but before the
    call that started it returned. The failed save's cleanup must still stop that request:
    before, nothing knew of it, and it went on after the save had failed (here its connection
    stalls, and it was sent again once ``stall_timeout`` passed, to an upload already aborted;
    on S3 a part that lands while its upload is aborted may keep its storage)."""
    run = unique()
    opts = s3_options(proxy.url, thread_count=1, stall_timeout=0.5, retry_attempts=2)
    proxy.faults.append(Fault("PUT", r"partNumber=1\b", "stall", times=1))
    _raise_after_hand_over(monkeypatch, "start")
    with pytest.raises((CheckpointException, _PreemptedError)):
        torchstow.save({"w": torch.randn(3 << 20)}, f"s3://{s3_bucket}/{run}/s", storage_options=opts)
    time.sleep(1.5)  # three stall timeouts: a request left running would have been sent again
    assert proxy.requests("PUT", r"partNumber=") == []  # (the stalled one is logged when the proxy closes)


def _save_interrupted_as_sent(
    monkeypatch: pytest.MonkeyPatch,
    when: Callable[[str, dict[str, Any]], bool],
    tensor: torch.Tensor,
    uri: str,
    options: dict[str, Any],
) -> None:
    """Save ``tensor`` at ``uri`` from the main thread while a signal handler raises there as
    a request ``when`` picks (by S3 method and arguments) is sent; the save must fail."""
    original = S3Requests._send

    async def send(self: S3Requests, method: str, kwargs: dict[str, Any], progress: Any) -> Any:
        if when(method, kwargs):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
        return await original(self, method, kwargs, progress)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _PreemptedError("SIGALRM: stop")

    monkeypatch.setattr(S3Requests, "_send", send)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises((CheckpointException, _PreemptedError)):
            torchstow.save({"w": tensor}, uri, storage_options=options)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _raise_after_hand_over(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``S3Requests.<name>`` raise, as a signal handler would, right after it handed its
    request to the event loop (before the call that sent it returns)."""
    original = getattr(S3Requests, name)

    def raising(self: S3Requests, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise _PreemptedError("SIGTERM: stop")

    monkeypatch.setattr(S3Requests, name, raising)
