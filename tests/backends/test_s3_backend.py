"""The S3 backend (s3fs) against a moto server on 127.0.0.1: multipart uploads and ranged
reads in parallel, retries of transient errors, clear permanent errors, several ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import torchstow
import torchstow.spi
from moto_s3 import s3_client
from torchstow import CheckpointException, CheckpointNotFoundError, StorageIOError
from torchstow.backends.fsspec.backend import FsspecBackend
from torchstow.backends.fsspec.s3 import S3Requests

from s3_faults import Fault, FaultProxy, Logged
from storage_helpers import free_port, s3_options, unique
from waits import wait_until


def _max_overlap(requests: list[Logged]) -> int:
    """The most requests that were in flight at one time."""
    events = sorted([(r.start, 1) for r in requests] + [(r.end, -1) for r in requests])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def _part_numbers(proxy: FaultProxy) -> list[int]:
    """The part numbers of the part uploads the proxy saw, sorted."""
    return sorted(
        int(re.findall(r"partNumber=(\d+)", r.path)[0]) for r in proxy.requests("PUT", "partNumber=")
    )


def test_parts_and_ranges_move_concurrently(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, range_size=2 << 20, thread_count=1)
    sd = {"w": torch.randn(4 << 20)}  # 16 MiB: three full parts and a short one
    proxy.faults.append(Fault("PUT", r"partNumber=", "delay", delay=0.5))
    proxy.faults.append(Fault("GET", r"/data-", "delay", delay=0.5))
    torchstow.save(sd, uri, storage_options=opts)
    parts = proxy.requests("PUT", r"partNumber=")
    assert _part_numbers(proxy) == [1, 2, 3, 4]
    assert len(proxy.requests("POST", r"uploadId=")) == 1  # one multipart upload, completed
    assert _max_overlap(parts) >= 3

    target = {"w": torch.zeros(4 << 20)}
    torchstow.load(target, uri, storage_options=opts)
    assert torch.equal(target["w"], sd["w"])
    ranges = proxy.requests("GET", r"/data-")
    assert len(ranges) >= 8  # 16 MiB in ranges of 2 MiB
    assert _max_overlap(ranges) >= 4


def test_a_file_within_the_multipart_threshold_is_one_put(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, thread_count=1, multipart_threshold=10 << 20)
    torchstow.save({"w": torch.randn((10 << 20) // 4)}, uri, storage_options=opts)  # two parts' worth
    assert proxy.requests("POST", r"uploads|uploadId") == []
    assert len(proxy.requests("PUT", r"/data-")) == 1
    torchstow.save({"w": torch.randn((10 << 20) // 4 + 1)}, uri, storage_options=opts, overwrite=True)
    assert _part_numbers(proxy) == [1, 2, 3]


def test_transient_errors_are_retried(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url)
    sd = {"w": torch.randn(3 << 20), "step": 3}  # 12 MiB: three parts
    proxy.faults += [
        Fault("PUT", r"partNumber=2\b", 503, times=2),  # throttled: SlowDown
        Fault("PUT", r"/manifest\.json", "reset", times=1),  # connection reset
        Fault("GET", r"/data-", 500, times=1),  # InternalError
        Fault("GET", r"/manifest\.json", 503, times=1),
    ]
    torchstow.save(sd, uri, storage_options=opts)
    assert [r.status for r in proxy.requests("PUT", r"partNumber=2\b")] == [503, 503, 200]
    assert [r.status for r in proxy.requests("PUT", r"/manifest\.json")] == ["reset", 200]

    target = {"w": torch.zeros(3 << 20), "step": None}
    torchstow.load(target, uri, storage_options=opts)
    assert torch.equal(target["w"], sd["w"])
    assert target["step"] == 3
    assert [r.status for r in proxy.requests("GET", r"/manifest\.json")] == [503, 200]  # a whole-object GET
    data_gets = proxy.requests("GET", r"/data-")
    assert data_gets[0].status == 500
    assert all(r.status == 206 for r in data_gets[1:])


def test_permanent_error_fails_at_once_and_commits_nothing(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url)
    proxy.faults.append(Fault("PUT", r"/manifest\.json", 403))
    with pytest.raises(StorageIOError) as caught:
        torchstow.save({"w": torch.ones(16)}, uri, storage_options=opts)
    message = str(caught.value)
    assert "AccessDenied (HTTP 403)" in message
    assert f"{uri}/manifest.json" in message
    assert "permanent error, not retried" in message
    assert isinstance(caught.value, CheckpointException)  # what every rank raises
    (cause, _), *_ = caught.value.failures.values()
    assert isinstance(cause, StorageIOError)
    assert not cause.transient
    assert cause.attempts == 1
    assert len(proxy.requests("PUT", r"/manifest\.json")) == 1
    with pytest.raises(CheckpointNotFoundError):  # the failed save removed its data objects too
        torchstow.info(uri, storage_options=opts)


def test_persistent_transient_error_gives_up_after_the_attempts(proxy: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, retry_attempts=3)
    torchstow.save({"w": torch.ones(16)}, uri, storage_options=opts)
    proxy.faults.append(Fault("GET", r"/data-", 503))
    with pytest.raises(StorageIOError, match=r"after 3 attempt\(s\).*SlowDown \(HTTP 503\)") as caught:
        torchstow.load({"w": torch.zeros(16)}, uri, storage_options=opts)
    (cause, _), *_ = caught.value.failures.values()  # what rank 0 raised
    assert isinstance(cause, StorageIOError)
    assert cause.transient
    assert cause.attempts == 3
    assert [r.status for r in proxy.requests("GET", r"/data-")] == [503, 503, 503]


def test_a_save_lists_its_own_location_only(proxy: FaultProxy, s3_bucket: str) -> None:
    # an empty location is one listing request: not also its parent's (s3fs's ls would list
    # the parent to tell an empty prefix from a missing one: in a bucket of many runs, pages
    # of their names, before the first byte goes up)
    run = unique()
    torchstow.save(
        {"w": torch.ones(16)}, f"s3://{s3_bucket}/{run}/step-1", storage_options=s3_options(proxy.url)
    )
    listings = proxy.requests("GET", r"list-type=2")
    assert listings
    assert {parse_qs(urlsplit(r.path).query)["prefix"][0] for r in listings} == {f"{run}/step-1/"}


def test_a_listing_reads_every_page(s3_endpoint: str, s3_bucket: str) -> None:
    # S3 lists at most 1000 keys a request: the rest come on later pages; a directory's own
    # marker object (what some tools make for a "folder") is not a file in it
    location = unique()
    client = s3_client(s3_endpoint)
    names = [f"data-{i:04d}" for i in range(1001)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda key: client.put_object(Bucket=s3_bucket, Key=key, Body=b""),
                [f"{location}/", f"{location}/sub/x", *(f"{location}/{n}" for n in names)],
            )
        )
    store = FsspecBackend(**s3_options(s3_endpoint)).open_store(f"s3://{s3_bucket}/{location}")
    assert sorted(store.list_files()) == names
    assert FsspecBackend(**s3_options(s3_endpoint)).child_names(f"s3://{s3_bucket}/{location}") == ["sub"]


def test_s3fs_is_imported_lazily_with_an_install_hint() -> None:
    code = """
import sys
import torchstow
schemes = {e.scheme for e in torchstow.spi.available_backends()}
assert {"s3", "memory", "shm", "file"} <= schemes, schemes
assert "s3fs" not in sys.modules and "fsspec" not in sys.modules, "imported eagerly"
sys.modules["s3fs"] = None  # as if s3fs were not installed
try:
    torchstow.save({}, "s3://bucket/ckpt")
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'torchstow[s3]'" in out.stdout
    assert "s3://bucket/ckpt" in out.stdout


def _two_rank_worker(rank: int, port: int, uri: str, opts: dict[str, Any]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shared = torch.arange(1000, dtype=torch.float32)  # replicated: stored once
        mine = torch.full((2 << 20,), float(rank))  # 8 MiB per rank: multipart
        torchstow.save({"shared": shared, f"rank{rank}": mine, "step": 4}, uri, storage_options=opts)
        target = {"shared": torch.zeros(1000), f"rank{rank}": torch.zeros(2 << 20), "step": None}
        torchstow.load(target, uri, storage_options=opts, strict=False)  # the other rank's key is not ours
        assert torch.equal(target["shared"], shared)
        assert torch.equal(target[f"rank{rank}"], mine)
        assert target["step"] == 4
        if rank == 0:
            whole = torchstow.read(uri, storage_options=opts)
            assert set(whole) == {"shared", "rank0", "rank1", "step"}
            assert torch.equal(whole["rank1"], torch.full((2 << 20,), 1.0))
            info = torchstow.info(uri, storage_options=opts)
            assert info.nbytes == 4000 + 2 * (8 << 20)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_save_and_load_over_gloo(s3_endpoint: str, s3_bucket: str) -> None:
    import torch.multiprocessing as mp

    uri = f"s3://{s3_bucket}/{unique()}/step-4"
    opts = s3_options(s3_endpoint)
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(_two_rank_worker, args=(free_port(), uri, opts), nprocs=2, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert torchstow.latest(uri.rsplit("/", 1)[0], storage_options=opts) == uri


def test_an_endpoint_that_is_no_s3_is_an_error_not_an_empty_listing(
    proxy: FaultProxy, s3_bucket: str
) -> None:
    # a web server (or a proxy's error page with status 200) where S3 should be: before, its
    # page read as an empty listing (no checkpoint there: a run would start afresh) and a
    # multipart upload failed with a bare KeyError
    run = unique()
    opts = s3_options(proxy.url, thread_count=1)
    torchstow.save({"w": torch.ones(16)}, f"s3://{s3_bucket}/{run}/step-1", storage_options=opts)
    proxy.faults.append(Fault("GET", r"list-type=2", "garbage", times=1))
    with pytest.raises(StorageIOError, match=r"reply to list_objects_v2 has no IsTruncated.*endpoint_url"):
        torchstow.latest(f"s3://{s3_bucket}/{run}", storage_options=opts)
    proxy.faults = [Fault("POST", r"\?uploads", "garbage")]
    with pytest.raises(CheckpointException) as caught:
        torchstow.save({"w": torch.randn(3 << 19)}, f"s3://{s3_bucket}/{run}/step-2", storage_options=opts)
    (cause, _), *_ = caught.value.failures.values()
    assert isinstance(cause, StorageIOError) and "has no UploadId" in str(cause)


@pytest.mark.parametrize(
    ("option", "kind"),
    [
        ({"endpoint_url": 123}, TypeError),
        ({"client_kwargs": "region_name=x"}, TypeError),
        ({"config_kwargs": {"connect_timout": 5}}, TypeError),
        ({"endpoint_url": "127.0.0.1 9000"}, ValueError),
    ],
)
def test_filesystem_options_s3fs_cannot_use_are_named(
    s3_endpoint: str, s3_bucket: str, option: dict[str, Any], kind: type[Exception]
) -> None:
    # refused before the save starts, as other bad options are; before: at its first request,
    # an error from inside botocore ("'int' object is not iterable") naming no option
    opts = {**s3_options(s3_endpoint), **option}
    with pytest.raises(kind, match="refused the storage options") as caught:
        torchstow.save({"w": torch.ones(4)}, f"s3://{s3_bucket}/{unique()}/s", storage_options=opts)
    assert next(iter(option)) in str(caught.value)
    assert "testing" not in str(caught.value)  # the values, which may be secrets, are not shown


def test_a_failed_load_leaves_no_read_writing_into_the_targets(proxy: FaultProxy, s3_bucket: str) -> None:
    # one ranged GET fails for good while the others are on their way (held half a second):
    # once the load has raised, nothing may write into the caller's tensors any more (a
    # caller that falls back to another checkpoint loads into them next); before, the other
    # GETs went on and wrote their bytes into the targets afterwards
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, range_size=1 << 20, thread_count=1)
    torchstow.save({"w": torch.randn(2 << 20)}, uri, storage_options=opts)  # 8 MiB: 8 ranges
    held = Fault("GET", r"/data-", "delay", delay=0.5)
    proxy.faults += [Fault("GET", r"/data-", 403, times=1), held]
    target = {"w": torch.zeros(2 << 20)}
    with pytest.raises(CheckpointException, match="AccessDenied"):
        torchstow.load(target, uri, storage_options=opts)
    after = target["w"].clone()
    wait_until(lambda: held.hits == 7, what="the other GETs to reach the proxy")
    time.sleep(1.0)  # twice the hold: a GET still running has written by then
    assert torch.equal(target["w"], after)


class _PreemptedError(Exception):
    """What the test's SIGALRM handler raises to stop a load."""


def test_a_load_interrupted_by_a_signal_handler_leaves_no_read_writing_into_the_targets(
    proxy: FaultProxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a signal handler raises in the thread waiting for the ranged GETs (held half a second):
    # once the load has raised, none of them may still write into the caller's tensors
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(proxy.url, range_size=1 << 20, thread_count=1)
    torchstow.save({"w": torch.randn(2 << 20)}, uri, storage_options=opts)
    held = Fault("GET", r"/data-", "delay", delay=0.5)
    proxy.faults.append(held)
    original, signalled = S3Requests.get_range, threading.Event()

    async def get_range(self: S3Requests, *args: Any, **kwargs: Any) -> int:
        if not signalled.is_set():  # once, as the first GET starts
            signalled.set()
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
        return await original(self, *args, **kwargs)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _PreemptedError("SIGALRM: stop")

    monkeypatch.setattr(S3Requests, "get_range", get_range)
    target = {"w": torch.zeros(2 << 20)}
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises((CheckpointException, _PreemptedError)):
            torchstow.load(target, uri, storage_options=opts)
    finally:
        signal.signal(signal.SIGALRM, previous)
    after = target["w"].clone()
    time.sleep(1.0)  # twice the hold: a GET still running has written by then
    assert torch.equal(target["w"], after)


def _keys_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in listed]


def test_objects_a_batch_delete_did_not_delete_are_retried_or_an_error(
    proxy: FaultProxy, s3_endpoint: str, s3_bucket: str
) -> None:
    # S3 answers DeleteObjects 200 and lists the objects it failed to delete; before, that
    # answer was taken for success: delete() returned and every object stayed
    run = unique()
    opts = s3_options(proxy.url)
    torchstow.save({"w": torch.ones(16)}, f"s3://{s3_bucket}/{run}/a", storage_options=opts)
    torchstow.save({"w": torch.ones(16)}, f"s3://{s3_bucket}/{run}/b", storage_options=opts)
    proxy.faults.append(Fault("POST", r"\?delete", "key-errors", code="InternalError", times=1))
    torchstow.delete(f"s3://{s3_bucket}/{run}/a", storage_options=opts)  # retried: gone
    assert _keys_under(s3_endpoint, s3_bucket, f"{run}/a/") == []
    proxy.faults.append(Fault("POST", r"\?delete", "key-errors", code="AccessDenied"))
    with pytest.raises(StorageIOError, match=r"AccessDenied.*not deleted.*a permanent error"):
        torchstow.delete(f"s3://{s3_bucket}/{run}/b", storage_options=opts)
    assert f"{run}/b/manifest.json" in _keys_under(s3_endpoint, s3_bucket, f"{run}/b/")
