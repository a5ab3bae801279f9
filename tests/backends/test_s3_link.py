"""The S3 backend through a shaped link (the fault proxy): the link's pacing and limit,
throttling survived, stalled connections retried within twice ``stall_timeout``, and a
dead link failing the save and the load on every rank in bounded time."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import http.client
import logging
import os
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from crc32c import crc32c
from test_s3_backend import _max_overlap

import torchstow
from moto_s3 import s3_client
from torchstow import CheckpointException
from torchstow.backends.fsspec.pacing import AdaptiveLimit, LinkEstimate, Progress, StallError, watch

from s3_faults import Fault, FaultProxy, Link, MiB
from storage_helpers import free_port, s3_options, unique
from waits import wait_until


@pytest.fixture
def link() -> Link:
    """The link a test's proxy shapes (a test overrides it by parametrizing ``link``)."""
    return Link()


@pytest.fixture
def shaped(s3_endpoint: str, link: Link) -> Iterator[FaultProxy]:
    """A proxy in front of moto that shapes ``link``."""
    proxy = FaultProxy(s3_endpoint, link=link)
    try:
        yield proxy
    finally:
        proxy.close()


def test_the_links_limit_is_the_best_schedule_its_caps_allow() -> None:
    link = Link(latency=0.02, per_connection=25 * MiB, total=200 * MiB)
    parts = [16 * MiB] * 64  # 1 GiB in parts of 16 MiB
    # eight connections: 8 parts each, a latency and 0.64 s apiece (the total cap alone: 5.12 s)
    assert link.best_time(parts, 8) == pytest.approx(8 * (0.02 + 0.64))
    assert link.limit(parts, 8) == pytest.approx(1024 * MiB / 5.28)
    assert link.best_time(parts, 64) == pytest.approx(1024 / 200)  # enough connections: the total cap
    assert link.best_time([100 * MiB], 64) == pytest.approx(0.02 + 4)  # one object: one connection
    throttled = Link(latency=0.02, per_connection=25 * MiB, total=200 * MiB, slowdown=0.05)
    assert throttled.best_time(parts, 8) == pytest.approx(link.best_time(parts, 8) / 0.95)


@pytest.mark.parametrize("link", [Link(latency=0.05, per_connection=8 * MiB)])
def test_the_proxy_paces_requests_as_the_link_says(shaped: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(shaped.url, thread_count=1)
    sd = {"w": torch.randn(4 << 20)}  # 16 MiB: parts of 5, 5, 5 and 1 MiB
    began = time.monotonic()
    torchstow.save(sd, uri, storage_options=opts)
    took = time.monotonic() - began
    parts = [5 * MiB, 5 * MiB, 5 * MiB, 1 * MiB]
    assert took >= 0.9 * shaped.link.best_time(parts, 8)  # no faster than the link allows
    assert all(r.end - r.start >= 0.05 for r in shaped.log)  # each request waited its latency


def test_adaptive_limit_halves_on_throttling_and_regains_one_per_success() -> None:
    async def run() -> list[int]:
        limit = AdaptiveLimit(16, start=8)
        seen = [limit.limit]
        limit.throttled(time.monotonic())
        seen.append(limit.limit)
        for _ in range(4):  # each success adds one back, up to the limit before the throttling
            async with limit:
                pass
            await limit.succeeded(1 << 20)
            seen.append(limit.limit)
        return seen

    assert asyncio.run(run()) == [8, 4, 5, 6, 7, 8]


def test_throttling_halves_once_per_round_of_requests() -> None:
    # a slow link refuses a part only once its body is through, long after the refusals of
    # its neighbours cut the limit: a refusal of a request sent before the cut counts once
    limit = AdaptiveLimit(32, start=16)
    sent = time.monotonic()
    for _ in range(4):  # a burst of refusals of requests all sent before the first cut
        limit.throttled(sent)
    assert limit.limit == 8
    limit.throttled(time.monotonic())  # refused though sent after the cut: the store still refuses
    assert limit.limit == 4
    limit.throttled(sent)  # a late refusal of the first round
    assert limit.limit == 4


def test_adaptive_limit_stops_doubling_once_twice_the_requests_move_less_than_half_more() -> None:
    limit = AdaptiveLimit(32, start=8)
    limit._end_epoch(0.0, saturated=True)  # an epoch that moved no data (uploads starting)
    assert limit.limit == 8
    limit._end_epoch(80.0, saturated=True)  # the first measure: probe further
    assert limit.limit == 16
    limit._end_epoch(100.0, saturated=True)  # 1.25x with twice the requests: the total binds
    assert limit.limit == 16
    limit._end_epoch(200.0, saturated=True)  # and the probing has stopped
    assert limit.limit == 16
    bound_by_connections = AdaptiveLimit(32, start=8)
    for rate, then in ((50.0, 16), (95.0, 32), (190.0, 32)):
        bound_by_connections._end_epoch(rate, saturated=True)
        assert bound_by_connections.limit == then


def test_a_round_of_requests_counts_only_the_requests_that_moved_data() -> None:
    # The uploads' starts (no data) end among the first parts: counted in the round, they
    # ended it with part of its bytes, so the link looked slower than it was
    async def run() -> list[int]:
        limit = AdaptiveLimit(32, start=4)
        for _ in range(4):
            await limit.__aenter__()
        limit._saturated()  # more requests wanted to go out
        seen = []
        for nbytes in (0, 0, MiB, MiB, MiB, MiB):  # two starts, then four parts
            await limit.__aexit__(None, None, None)
            await limit.succeeded(nbytes)
            seen.append(limit.limit)
            await limit.__aenter__()  # the next request
        return seen

    assert asyncio.run(run()) == [4, 4, 4, 4, 4, 8]  # the round is the four parts


def _get_overlap(proxy: FaultProxy) -> int:
    return _max_overlap([r for r in proxy.requests("GET", r"/data-") if r.status == 206])


@pytest.mark.parametrize("link", [Link(per_connection=2 * MiB)])
def test_requests_in_flight_rise_while_the_links_throughput_grows(shaped: FaultProxy, s3_bucket: str) -> None:
    # Each connection is capped and the total is not: more requests in flight move more
    # bytes, so the limit is raised past where it starts (16), up to the ceiling (32).
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    sd = {"w": torch.randn(12 << 20)}  # 48 MiB, read in 96 ranges of 512 KiB (32 at a time)
    torchstow.save(sd, uri, storage_options=s3_options(shaped.url))
    back = torchstow.read(uri, storage_options=s3_options(shaped.url, range_size=1 << 19))
    assert torch.equal(back["w"], sd["w"])
    assert 16 < _get_overlap(shaped) <= 32


@pytest.mark.parametrize("link", [Link(per_connection=2 * MiB)])
def test_max_concurrency_set_is_kept_where_the_link_would_take_more(
    shaped: FaultProxy, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    sd = {"w": torch.randn(12 << 20)}
    torchstow.save(sd, uri, storage_options=s3_options(shaped.url))
    opts = s3_options(shaped.url, range_size=1 << 20, max_concurrency=6)
    assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], sd["w"])
    assert _get_overlap(shaped) == 6  # neither fewer (it starts there) nor more


def test_parts_grow_with_the_links_bandwidth_delay_product_unless_part_size_is_set() -> None:
    link = LinkEstimate()
    assert link.request_size(16 * MiB, 64 * MiB) == 16 * MiB  # nothing measured yet
    link.observe(0, 0.05)  # a request's fixed cost: 50 ms
    link.observe(32 * MiB, 0.05 + 0.5)  # one connection: 64 MiB/s
    assert link.request_size(16 * MiB, 64 * MiB) == 52 * MiB  # 16 x 50 ms x 64 MiB/s, in MiB
    link.observe(0, 1.0)  # a slow store
    assert link.request_size(16 * MiB, 64 * MiB) == 64 * MiB  # at most the largest


@pytest.mark.parametrize("link", [Link(latency=0.1)])
def test_a_set_part_size_is_kept_however_the_link_measures(
    shaped: FaultProxy, s3_bucket: str, s3_endpoint: str
) -> None:
    # 100 ms per request and no bandwidth cap: the link asks for larger parts
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    # one part in flight, so later parts are cut after the first ones have measured the link
    opts = s3_options(shaped.url, thread_count=1, max_concurrency=1)
    del opts["part_size"]
    sd = {"w": torch.randn(24 << 20)}  # 96 MiB
    torchstow.save(sd, uri, storage_options=opts)
    adaptive = len(shaped.requests("PUT", r"partNumber="))
    torchstow.save(sd, uri + "-set", storage_options={**opts, "part_size": 16 * MiB})
    fixed = len(shaped.requests("PUT", r"partNumber=")) - adaptive
    assert fixed == 6  # 96 MiB in parts of exactly 16 MiB
    assert adaptive < fixed  # unset: larger parts once the link was measured


@pytest.mark.parametrize("link", [Link(per_connection=4 * MiB)])
def test_throttling_lowers_the_requests_in_flight_then_regains_them(
    shaped: FaultProxy, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    sd = {"w": torch.randn(8 << 20)}  # 32 MiB, read in 32 ranges of 1 MiB
    torchstow.save(sd, uri, storage_options=s3_options(shaped.url))
    shaped.faults.append(Fault("GET", r"/data-", 503, times=2))
    opts = s3_options(shaped.url, range_size=1 << 20, max_concurrency=8)
    with caplog.at_level(logging.DEBUG, logger="torchstow.backends.fsspec.pacing"):
        assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], sd["w"])
    messages = [r.getMessage() for r in caplog.records]
    assert "throttled: requests in flight 8 -> 4" in messages
    assert "requests in flight regained: 8" in messages
    last_refusal = max(r.end for r in shaped.requests("GET", r"/data-") if r.status == 503)
    after = [r for r in shaped.requests("GET", r"/data-") if r.status == 206 and r.start > last_refusal]
    assert _max_overlap(after) == 8  # back to where it was


@pytest.mark.parametrize("link", [Link(slowdown=0.05, seed=3)])
def test_throttling_is_survived(shaped: FaultProxy, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(shaped.url, thread_count=2, range_size=1 << 20)
    sd = {"a": torch.randn(5 << 20), "b": torch.randn(5 << 20)}  # 40 MiB: 8 parts, 40 ranged reads
    torchstow.save(sd, uri, storage_options=opts)
    back = torchstow.read(uri, storage_options=opts)
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    assert any(r.status == 503 for r in shaped.log)  # throttled, and got through


def test_a_part_a_failed_attempt_still_views_is_sent_again_intact(s3_endpoint: str, s3_bucket: str) -> None:
    # a refused part's attempt leaves views of its body in its exception's frames until
    # the cycle collector runs; the part is sent again from the same memory, and a later
    # file's last, short part must not disturb memory those views still show
    proxy = FaultProxy(s3_endpoint, faults=[Fault("PUT", r"partNumber=", 503, times=4)])
    gc.disable()
    try:
        uri = f"s3://{s3_bucket}/{unique()}/step-1"
        opts = s3_options(proxy.url, thread_count=1, max_concurrency=1)
        sd = {f"w{i}": torch.randn((11 << 20) // 4) for i in range(3)}  # 11 MiB each: 5 + 5 + 1
        torchstow.save(sd, uri, storage_options=opts)
        back = torchstow.read(uri, storage_options=opts)
        assert all(torch.equal(back[k], v) for k, v in sd.items())
    finally:
        gc.enable()
        proxy.close()


def test_a_save_copies_no_tensor_bytes_into_the_parts_it_uploads(s3_endpoint: str, s3_bucket: str) -> None:
    # while two 5 MiB parts of a tensor are in flight (the store answers each after 0.25 s),
    # the client holds them as the tensor's own memory: it has allocated nothing near a part
    delayed = Fault("PUT", r"partNumber=", "delay", times=2, delay=0.25)
    proxy = FaultProxy(s3_endpoint, faults=[delayed])
    sd = {"w": torch.randn(3 << 20)}  # 12 MiB: three parts
    opts = s3_options(proxy.url, thread_count=1, max_concurrency=2)
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    torchstow.save({"x": torch.zeros(1)}, f"{uri}-warm", storage_options=opts)  # the client made first
    tracemalloc.start()
    try:
        with ThreadPoolExecutor(1) as pool:
            saving = pool.submit(torchstow.save, sd, uri, storage_options=opts)
            wait_until(lambda: delayed.hits == 2 or saving.done(), what="two parts in flight")
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*torchstow*")])
            saving.result()
            assert delayed.hits == 2, "the save ended before two parts were held: nothing was measured"
    finally:
        tracemalloc.stop()
        proxy.close()
    held = sum(stat.size for stat in snapshot.statistics("filename"))
    assert held < 1 << 20, snapshot.statistics("lineno")[:3]
    assert torch.equal(torchstow.read(uri, storage_options=s3_options(s3_endpoint))["w"], sd["w"])


def test_parts_of_many_small_tensors_and_large_ones_round_trip(s3_endpoint: str, s3_bucket: str) -> None:
    # small tensors are gathered into scratch buffers (reused from part to part), large
    # ones sent as they are: parts mixing both, across scratch buffers, keep every byte
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 3000, (2500,), generator=gen).tolist()
    sd = {f"s{i}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=gen) for i, n in enumerate(sizes)}
    sd.update({f"big{i}": torch.randn(700_000, generator=gen) for i in range(4)})  # 2.7 MiB each
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    opts = s3_options(s3_endpoint, thread_count=1)
    torchstow.save(sd, uri, storage_options=opts)
    back = torchstow.read(uri, storage_options=opts)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_a_cancelled_upload_sends_no_more_of_its_body_when_the_peer_reads_again() -> None:
    # a stalled upload is cancelled (then sent again on another connection): its first
    # connection must not send the rest of the body once the peer reads again. The HTTP client
    # closes a cancelled request's connection gracefully (aiohttp's ClientResponse.close), which
    # flushes what the connection still holds; from Python 3.12 on that is a view of the body's
    # own memory (a tensor's, a scratch buffer's), which the writer may have reused by then
    body = bytearray(b"A" * (32 << 20))  # far more than the kernel's socket buffers take
    server = socket.create_server(("127.0.0.1", 0))
    release, finished, received = threading.Event(), threading.Event(), bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            release.wait(60)  # a stalled peer: it reads nothing until the request was given up
            try:
                while chunk := conn.recv(1 << 20):
                    received.extend(chunk)
            except ConnectionResetError:
                pass
        finished.set()

    async def run() -> None:
        _, writer = await asyncio.open_connection(*server.getsockname())
        progress = Progress()
        progress.sending_on(writer.transport)

        async def request() -> None:
            try:
                writer.transport.write(memoryview(body))  # the body handed to the connection
                await asyncio.Event().wait()  # no answer
            except asyncio.CancelledError:
                writer.transport.close()  # as the HTTP client closes a cancelled request's connection
                raise

        with pytest.raises(StallError):
            await watch(request(), progress, 0.3, "an upload")
        body[:] = b"B" * len(body)  # the memory reused (the next part, the next save)
        release.set()
        # the event loop runs on (as the client's does) until the peer has read all it gets
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, 60)

    peer = threading.Thread(target=serve)
    peer.start()
    try:
        asyncio.run(run())
    finally:
        release.set()
        peer.join(60)
        server.close()
    sent, reused = len(received), received.count(b"B")
    assert reused == 0  # no byte of the memory as reused after the cancel
    assert sent < len(body)  # what the connection still held was dropped, not sent later


@pytest.mark.parametrize(
    ("stall", "phase"),
    [(("PUT", r"partNumber=2\b", "stall"), "save"), (("GET", r"/data-", "stall-reply"), "load")],
)
@pytest.mark.parametrize("client_timeout", [None, 1000.0], ids=["client-times-out-too", "watchdog-alone"])
def test_a_stalled_connection_is_retried_within_twice_the_stall_timeout(
    shaped: FaultProxy, s3_bucket: str, stall: tuple[str, str, str], phase: str, client_timeout: float | None
) -> None:
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    stall_timeout = 2.0
    fault = Fault(*stall, times=1)
    opts = s3_options(shaped.url, thread_count=1, stall_timeout=stall_timeout)
    if client_timeout is not None:  # the HTTP client's own read timeout out of the way: the watchdog's work
        opts["config_kwargs"] = {"read_timeout": client_timeout}
    sd = {"w": torch.randn(3 << 20)}  # 12 MiB: three parts (one ranged read)
    if phase == "save":
        shaped.faults.append(fault)
    torchstow.save(sd, uri, storage_options=opts)
    if phase == "load":
        shaped.faults.append(fault)
    back = torchstow.read(uri, storage_options=opts)
    assert fault.hits == 1  # it did stall once
    assert torch.equal(back["w"], sd["w"])
    # the stall's cost, timed at the proxy from the stalled request's arrival to its retry's
    # (the rest of the save or load, which a loaded machine slows, is not the watchdog's)
    (stalled,) = fault.at
    retries = [r.start - stalled for r in shaped.requests(*stall[:2]) if r.start > stalled]
    assert len(retries) == 1, shaped.log
    assert stall_timeout <= retries[0] < 2 * stall_timeout


@pytest.mark.parametrize("link", [Link(per_connection=2 * MiB)])
def test_a_slow_link_that_keeps_moving_is_not_a_stall(shaped: FaultProxy, s3_bucket: str) -> None:
    # a part takes 2.5 s on the wire, 2.5 x stall_timeout: a stall is no byte moving for
    # stall_timeout, not a request taking longer (most of a part waits in the kernel's send
    # buffer once the HTTP client has handed it over, so the bytes must be seen leave)
    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    stall_timeout = 1.0
    opts = s3_options(shaped.url, thread_count=1, stall_timeout=stall_timeout, range_size=5 << 20)
    sd = {"w": torch.randn(5 << 20)}  # 20 MiB: four parts, four ranged reads, side by side
    torchstow.save(sd, uri, storage_options=opts)
    assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], sd["w"])
    parts, reads = shaped.requests("PUT", r"partNumber="), shaped.requests("GET", r"/data-")
    assert [r.status for r in parts] == [200] * 4 and [r.status for r in reads] == [206] * 4  # none retried
    assert min(r.end - r.start for r in parts + reads) > 2 * stall_timeout  # each one slower than that


def _dead_link_worker(rank: int, port: int, uri: str, opts: dict[str, Any], phase: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        began = time.monotonic()
        try:
            if phase == "save":
                torchstow.save({f"r{rank}": torch.ones(1 << 20)}, uri, storage_options=opts)
            else:
                torchstow.load({"w": torch.zeros(1 << 20)}, uri, storage_options=opts)
        except CheckpointException as exc:
            with open(f"{out}.{rank}", "w") as f:
                f.write(f"{time.monotonic() - began}\n{exc}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["save", "load"])
def test_a_dead_link_fails_on_every_rank_in_bounded_time(
    shaped: FaultProxy, s3_bucket: str, tmp_path: Any, phase: str
) -> None:
    import torch.multiprocessing as mp

    uri = f"s3://{s3_bucket}/{unique()}/step-1"
    stall_timeout, attempts = 1.0, 2
    opts = s3_options(shaped.url, stall_timeout=stall_timeout, retry_attempts=attempts)
    if phase == "load":
        torchstow.save({"w": torch.ones(1 << 20)}, uri, storage_options=opts)
    shaped.faults += [
        Fault(m, "", "stall") for m in ("GET", "PUT", "POST", "HEAD", "DELETE")
    ]  # nothing answers
    out = str(tmp_path / "failed")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_dead_link_worker, args=(free_port(), uri, opts, phase, out), nprocs=2, join=True)
    # the documented bound (docs/backends.md): 2 x retry_attempts x (stall_timeout + backoff)
    bound = 2 * attempts * (stall_timeout + 0.01)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            took, message = f.read().split("\n", 1)
        assert float(took) < bound + 3, (rank, took, message)  # + the process group's messages
        assert "stall_timeout" in message, message


def test_max_concurrency_bounds_the_requests_in_flight(s3_endpoint: str, s3_bucket: str) -> None:
    proxy = FaultProxy(s3_endpoint)
    try:
        uri = f"s3://{s3_bucket}/{unique()}/step-1"
        opts = s3_options(proxy.url, thread_count=1, range_size=1 << 20, max_concurrency=2)
        sd = {"w": torch.randn(5 << 20)}  # 20 MiB: four parts, twenty ranged reads
        proxy.faults += [
            Fault("PUT", r"partNumber=", "delay", delay=0.3),
            Fault("GET", r"/data-", "delay", delay=0.1),
        ]
        torchstow.save(sd, uri, storage_options=opts)
        assert torch.equal(torchstow.read(uri, storage_options=opts)["w"], sd["w"])
        assert _max_overlap(proxy.requests("PUT", r"partNumber=")) == 2
        assert _max_overlap(proxy.requests("GET", r"/data-")) == 2
    finally:
        proxy.close()


@pytest.mark.parametrize("config", [None, {"request_checksum_calculation": "when_required"}])
def test_every_body_carries_its_crc32c_and_no_sha256_signature_unless_config_kwargs_says(
    s3_endpoint: str, s3_bucket: str, config: dict[str, str] | None
) -> None:
    # the store checks each body's CRC32C, computed in a writer's thread: over plain http
    # botocore would otherwise sign each body's SHA-256 on the event loop; a client config
    # that asks for checksums only where required gets none, and its bodies signed
    proxy = FaultProxy(s3_endpoint)
    try:
        uri = f"s3://{s3_bucket}/{unique()}/step-1"
        opts = s3_options(proxy.url, thread_count=1)
        if config is not None:
            opts["config_kwargs"] = config
        torchstow.save({"w": torch.randn(3 << 20)}, uri, storage_options=opts)  # 12 MiB: three parts
        client = s3_client(s3_endpoint)
        # the proxy logs a request once it has relayed the reply, which the save may outrun
        wait_until(lambda: bool(proxy.requests("PUT", r"/manifest\.json$")), what="the manifest's PUT logged")
        parts = proxy.requests("PUT", r"partNumber=")
        puts = [*parts, *proxy.requests("PUT", r"/manifest\.json$")]
        assert len(parts) == 3 and len(puts) == 4
        for put in puts:  # what the store holds of each body (a part: by its number)
            url = urlsplit(put.path)
            query = parse_qs(url.query)
            part = {"PartNumber": int(query["partNumber"][0])} if "partNumber" in query else {}
            stored = client.get_object(Bucket=s3_bucket, Key=url.path.split("/", 2)[2], **part)["Body"].read()
            crc = base64.b64encode(crc32c(stored).to_bytes(4, "big")).decode()
            sha256 = put.headers["x-amz-content-sha256"]
            if config is None:
                assert put.headers.get("x-amz-checksum-crc32c") == crc, put.path
                assert sha256 == "UNSIGNED-PAYLOAD", put.path
            else:
                assert not any(h.startswith("x-amz-checksum-") for h in put.headers), put.headers
                assert sha256 == hashlib.sha256(stored).hexdigest(), put.path
        started = proxy.requests("POST", r"\?uploads")[0]
        assert started.headers.get("x-amz-checksum-algorithm") == ("CRC32C" if config is None else None)
    finally:
        proxy.close()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset, as a client cancelling a request does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_going_away_is_counted_not_reported(
    proxy: FaultProxy, capfd: pytest.CaptureFixture[str]
) -> None:
    # a request cancelled mid-body, and a kept-alive connection dropped between requests: a
    # fault proxy sees both all the time, and neither is an error (no traceback in the log)
    address = urlsplit(proxy.url)
    mid_body = socket.create_connection((address.hostname, address.port))
    mid_body.sendall(b"PUT /b/k HTTP/1.1\r\nHost: s3\r\nContent-Length: 1048576\r\n\r\n" + bytes(1000))
    idle = socket.create_connection((address.hostname, address.port))
    idle.sendall(b"HEAD /b HTTP/1.1\r\nHost: s3\r\n\r\n")
    assert idle.recv(1 << 16).startswith(b"HTTP/1.1")
    wait_until(lambda: bool(proxy.requests("HEAD", "/b")), what="the HEAD answered")
    _reset(mid_body)
    _reset(idle)
    wait_until(lambda: proxy.gone == 2, what="both clients seen gone")
    assert "Traceback" not in capfd.readouterr().err


def test_an_upstream_failure_is_still_reported(capfd: pytest.CaptureFixture[str]) -> None:
    proxy = FaultProxy(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        address = urlsplit(proxy.url)
        client = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        client.request("GET", "/b/k")
        with pytest.raises(http.client.RemoteDisconnected):  # after the proxy reported the error
            client.getresponse()
        err = capfd.readouterr().err
        assert "UpstreamError" in err and "Traceback" in err, err
        assert proxy.gone == 0
    finally:
        proxy.close()
