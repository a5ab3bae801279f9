"""S3 through a shaped link: save and load through the fault proxy (latency, bandwidth caps
per connection and in total, optionally 5% of requests answered 503 SlowDown) in front
of a moto server, against the link's limit and the peers that run against a local server.

python benchmarks/bench_s3_link.py [--mib 1024] [--repeats 3]
    [--link LATENCY,PER_CONNECTION_MIB,TOTAL_MIB ...] [--ops save,load] [--no-slowdown]
    [--only CONTENDER] [--alternate 'NAME:OPTION=VALUE,...;NAME:...']

Contenders: torchstow (its defaults: requests in flight, part and range sizes chosen from
the link); DCP with its fsspec writer and reader (8 threads); boto3's transfer manager (one
object, its default concurrency of 10, 16 MiB parts); s3torchconnector's DCP
``S3StorageWriter``/``S3StorageReader`` (AWS CRT, 8 threads; its client pointed at the proxy)
when installed (else its exact error is printed). First every contender's save straight to
the server, no link between ("the server alone": what the server, moto in Python on the
same cores, allows that contender at all), and torchstow's load. Then, for each link
(default: the issue's 20 ms, 25 MiB/s per connection, 200 MiB/s in all, and one capped at
100 MiB/s in all, 12.5 MiB/s per connection, below what the server alone takes here), every
contender through it, and torchstow with 5% of the requests answered 503 SlowDown. The
link's limit is what its caps allow at best for the bytes in 16 MiB requests over as many
connections as help (:meth:`Link.limit`). The proxy runs in a process of its own (its
threads pace every byte; in the client's process they would take the client's
interpreter). The server is moto's own application as ``tests/moto_s3.py`` hosts it
(each request body read in one piece, its allocator keeping freed memory, its heap grown
once at start: see ``bench_s3.moto_server``); it keeps objects in memory (``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``,
rather than spilling each one over 5 MiB to a temporary file), each contender's objects
are deleted after its round (untimed), and its CPU seconds per GiB are reported with
each row. ``--ops save`` skips the loads (each save is then
checked by the bytes it stored; DCP's fsspec reader takes minutes per GiB). A small run
(``--mib 64 --repeats 1``) takes seconds. ``--alternate`` compares storage options of
torchstow's save (``max_concurrency``, ``part_size`` in MiB) side by side instead: one
save of each setting per round, the order reversed every other round."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import torchstow

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
TESTS = os.path.join(HERE, "..", "tests", "backends")
sys.path.insert(0, TESTS)  # the shaped proxy lives with the tests

from bench_s3 import BUCKET, cpu_seconds, moto_server, packed_bytes, server_cpu_seconds, unpack_into  # noqa: E402
from common import assert_equal, large_state_dict, tensor_bytes, timed, zeros_like_state_dict  # noqa: E402
from s3_faults import Link, MiB  # noqa: E402

GiB = 1 << 30

CREDS = {"key": "bench", "secret": "bench"}

Op = Callable[[Any, str], Any]
OPS = ("save", "load")
# The link, and one whose total cap is below what the server alone (moto, in Python,
# on the same 2 cores as everything else) ingests here, so that its limit is reachable
LINKS = ("0.02,25,200", "0.02,12.5,100")


def peers(endpoint: str) -> dict[str, tuple[Op, Op]]:
    """``name -> (save, load)`` of each way to use S3 through ``endpoint``."""
    os.environ.update(AWS_ACCESS_KEY_ID=CREDS["key"], AWS_SECRET_ACCESS_KEY=CREDS["secret"])  # for the CRT
    import boto3
    from boto3.s3.transfer import TransferConfig

    opts = {**CREDS, "endpoint_url": endpoint}
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDS["key"],
        aws_secret_access_key=CREDS["secret"],
        region_name="us-east-1",
    )
    transfer = TransferConfig(multipart_chunksize=16 * MiB, multipart_threshold=16 * MiB)

    def key(url: str) -> str:
        return url.split("/", 3)[3]

    def boto3_save(sd: Any, url: str) -> None:
        import io

        body = io.BytesIO(packed_bytes(sd))
        client.upload_fileobj(body, BUCKET, key(url), Config=transfer)

    def boto3_load(target: Any, url: str) -> None:
        import io

        out = io.BytesIO()
        client.download_fileobj(BUCKET, key(url), out, Config=transfer)
        unpack_into(target, out.getbuffer())

    found: dict[str, tuple[Op, Op]] = {
        "torchstow": (
            lambda sd, url: torchstow.save(sd, url, storage_options=opts),
            lambda sd, url: torchstow.load(sd, url, storage_options=opts),
        ),
        "dcp fsspec t=8": (
            lambda sd, url: dcp.save(
                sd, storage_writer=FsspecWriter(url, thread_count=8, **opts), no_dist=True
            ),
            lambda sd, url: dcp.load(sd, storage_reader=FsspecReader(url, **opts), no_dist=True),
        ),
        "boto3 transfer manager": (boto3_save, boto3_load),
    }
    try:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
        from s3torchconnector.dcp.s3_file_system import S3FileSystem
    except ImportError as exc:
        print(f"  s3torchconnector: not measured ({type(exc).__name__}: {exc})", flush=True)
    else:

        def crt(io: Any) -> Any:
            """``io`` with its S3 client pointed at ``endpoint`` (its DCP classes take no endpoint)."""
            config = S3ClientConfig(force_path_style=True)
            io.fs = S3FileSystem(
                "us-east-1", s3_client=S3Client("us-east-1", endpoint=endpoint, s3client_config=config)
            )
            return io

        found["s3torchconnector dcp t=8"] = (
            lambda sd, url: dcp.save(
                sd, storage_writer=crt(S3StorageWriter("us-east-1", url, thread_count=8)), no_dist=True
            ),
            lambda sd, url: dcp.load(sd, storage_reader=crt(S3StorageReader("us-east-1", url)), no_dist=True),
        )
    return found


@contextmanager
def shaped_link(upstream: str, link: Link | None) -> Iterator[tuple[str, int | None]]:
    """The endpoint to use and the proxy's process id: a proxy shaped as ``link`` in front of
    ``upstream``, in a process of its own (``upstream`` itself, and None, when ``link`` is None)."""
    if link is None:
        yield upstream, None
        return
    args = [sys.executable, os.path.join(TESTS, "s3_faults.py"), upstream, "--latency", str(link.latency)]
    args += ["--slowdown", str(link.slowdown), "--seed", str(link.seed)]
    for flag, value in (("--per-connection", link.per_connection), ("--total", link.total)):
        if value is not None:
            args += [flag, str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(
    link: Link | None, mib: int, repeats: int, only: str | None = None, ops: tuple[str, ...] = OPS
) -> dict[str, float]:
    """Median seconds of each contender's (or ``only`` one's) save and load (those of ``ops``)
    through ``link`` (None: straight to the server), by ``"save NAME"`` and ``"load NAME"``,
    and the CPU seconds of each process meanwhile (the median's run): the server's by
    ``"server save NAME"``, this process's (the contender's client) by ``"client save NAME"``
    and the proxy's by ``"proxy save NAME"``. Without a load, each save is checked by the
    bytes it stored."""
    import s3fs

    sd = large_state_dict(mib * MiB, max(1, mib // 64))
    medians: dict[str, float] = {}
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(4 << 30))  # objects in memory
    with moto_server() as upstream:
        fs = s3fs.S3FileSystem(**CREDS, endpoint_url=upstream, skip_instance_cache=True)
        fs.mkdir(BUCKET)

        with shaped_link(upstream, link) as (endpoint, proxy):

            def measured(fn: Callable[[], Any]) -> tuple[float, float, float, float]:
                """``fn``'s seconds, and the server's, this process's and the proxy's CPU
                seconds meanwhile."""
                before = server_cpu_seconds(upstream), _own_cpu_seconds(), cpu_seconds(proxy)
                (seconds,) = timed(fn, 1)
                after = server_cpu_seconds(upstream), _own_cpu_seconds(), cpu_seconds(proxy)
                return seconds, *(b - a for a, b in zip(before, after, strict=True))

            for name, (save, load) in peers(endpoint).items():
                if only is not None and name != only:
                    continue
                target = zeros_like_state_dict(sd)
                times: dict[str, list[tuple[float, float, float, float]]] = {op: [] for op in ops}
                for _ in range(repeats):
                    url = f"s3://{BUCKET}/{name.replace(' ', '-').replace('=', '')}-{uuid.uuid4().hex[:8]}"
                    times["save"].append(measured(lambda save=save, url=url: save(sd, url)))
                    if "load" in ops:
                        times["load"].append(measured(lambda load=load, url=url, t=target: load(t, url)))
                    else:
                        assert fs.du(url) >= tensor_bytes(sd), (name, fs.du(url))
                    fs.rm(url, recursive=True)  # untimed: the server's memory stays flat
                if "load" in ops:
                    assert_equal(sd, target)
                for op, runs in times.items():
                    seconds, server, client, proxy_cpu = sorted(runs)[len(runs) // 2]
                    medians[f"{op} {name}"] = seconds
                    medians[f"server {op} {name}"] = server
                    medians[f"client {op} {name}"] = client
                    medians[f"proxy {op} {name}"] = proxy_cpu
    return medians


def alternate(link: Link, mib: int, rounds: int, settings: dict[str, dict[str, int]]) -> None:
    """torchstow's save through ``link`` with each of ``settings`` (name -> storage options),
    alternated round by round (every other round in reverse) on one server and one proxy, so
    the machine's load hits each alike; prints each save, the limit the adaptive rule ended
    at, and the medians."""
    import logging
    import statistics
    import time

    import s3fs

    decisions: list[str] = []

    class Trail(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            decisions.append(record.getMessage())

    pacing = logging.getLogger("torchstow.backends.fsspec.pacing")
    pacing.setLevel(logging.DEBUG)
    pacing.addHandler(Trail())
    sd = large_state_dict(mib * MiB, max(1, mib // 64))
    nbytes = tensor_bytes(sd)
    requests = [16 * MiB] * max(1, nbytes // (16 * MiB))
    limit = link.limit(requests, connections=len(requests))
    print(f"link: {describe(link)}; its limit for {mib} MiB: {limit / MiB:.0f} MiB/s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in settings}
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(4 << 30))
    with moto_server() as upstream, shaped_link(upstream, link) as (endpoint, _):
        fs = s3fs.S3FileSystem(**CREDS, endpoint_url=upstream, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        for round_ in range(rounds):
            names = list(settings) if round_ % 2 == 0 else list(settings)[::-1]
            for name in names:
                url = f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
                decisions.clear()
                start = time.perf_counter()
                torchstow.save(sd, url, storage_options={**CREDS, "endpoint_url": endpoint, **settings[name]})
                rate = nbytes / (time.perf_counter() - start)
                assert fs.du(url) >= nbytes, (name, fs.du(url))
                fs.rm(url, recursive=True)  # untimed
                rates[name].append(rate)
                last = decisions[-1].rsplit("now ", 1)[-1] if decisions else "-"
                print(
                    f"  round {round_} {name:<12} {rate / MiB:6.1f} MiB/s {rate / limit:5.2f}x the limit"
                    f"  (requests in flight at the end: {last}; load {_loadavg()})",
                    flush=True,
                )
    for name, runs in rates.items():
        median = statistics.median(runs)
        print(
            f"  {name:<12} median {median / MiB:6.1f} MiB/s {median / limit:5.2f}x the limit"
            f"  (runs {', '.join(f'{r / MiB:.0f}' for r in runs)})",
            flush=True,
        )


def parse_settings(text: str) -> dict[str, dict[str, int]]:
    """``NAME:KEY=VALUE,...;NAME:...`` (part_size in MiB; ``NAME:`` for the defaults)."""
    settings = {}
    for spec in text.split(";"):
        name, _, options = spec.partition(":")
        pairs = (pair.split("=") for pair in options.split(",") if pair)
        settings[name] = {key: int(value) * (MiB if key == "part_size" else 1) for key, value in pairs}
    return settings


def parse_link(text: str) -> Link:
    """``LATENCY,PER_CONNECTION_MIB,TOTAL_MIB`` (seconds, MiB/s, MiB/s) as a :class:`Link`."""
    latency, per_connection, total = (float(x) for x in text.split(","))
    return Link(latency, per_connection * MiB, total * MiB)


def describe(link: Link) -> str:
    return (
        f"{link.latency * 1000:g} ms per request, {(link.per_connection or 0) / MiB:g} MiB/s per connection, "
        f"{(link.total or 0) / MiB:g} MiB/s in all"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=1024, help="bytes of tensors to save and load, in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--link",
        action="append",
        type=parse_link,
        help="LATENCY,PER_CONNECTION_MIB,TOTAL_MIB (repeatable; default: both of LINKS)",
    )
    parser.add_argument("--ops", default=",".join(OPS), help="save,load or either alone")
    parser.add_argument("--no-slowdown", action="store_true", help="skip the runs with 5%% 503 SlowDown")
    parser.add_argument("--only", help="one contender (torchstow, 'boto3 transfer manager' ...)")
    parser.add_argument(
        "--alternate",
        type=parse_settings,
        help="torchstow's save alone, with each of these storage options alternated round by round "
        "(--repeats rounds) through each link: 'auto:;c16:max_concurrency=16,part_size=8' (MiB)",
    )
    args = parser.parse_args()
    links = args.link or [parse_link(text) for text in LINKS]
    if args.alternate:
        print(f"load average at the start: {_loadavg()}", flush=True)
        for link in links:
            alternate(link, args.mib, args.repeats, args.alternate)
        print(f"load average at the end: {_loadavg()}", flush=True)
        return
    ops = tuple(op for op in OPS if op in args.ops.split(","))
    nbytes = tensor_bytes(large_state_dict(args.mib * MiB, max(1, args.mib // 64)))
    requests = [16 * MiB] * max(1, nbytes // (16 * MiB))
    print(f"load average at the start: {_loadavg()}", flush=True)
    # no link between: what the server allows each contender's save at all, and torchstow's load
    bare = run(None, args.mib, args.repeats, only=args.only, ops=("save",))
    if "load" in ops:
        bare.update(run(None, args.mib, args.repeats, only="torchstow", ops=ops))
    print("no link (the server alone; CPU seconds per GiB moved):", flush=True)
    for op_name, seconds in bare.items():
        if op_name.split()[0] in OPS:
            print(
                f"  {op_name:<32} {nbytes / seconds / MiB:7.1f} MiB/s  {_cpu(bare, op_name, nbytes)}",
                flush=True,
            )
    for link in links:
        limit = link.limit(requests, connections=len(requests))
        print(f"link: {describe(link)}; its limit for {args.mib} MiB: {limit / MiB:.0f} MiB/s", flush=True)
        clean = run(link, args.mib, args.repeats, only=args.only, ops=ops)
        for op_name, seconds in clean.items():
            if op_name.split()[0] not in OPS:
                continue
            rate = nbytes / seconds
            print(
                f"  {op_name:<32} {rate / MiB:7.1f} MiB/s  {rate / limit:5.2f}x the limit  "
                f"({_cpu(clean, op_name, nbytes)})",
                flush=True,
            )
        if args.no_slowdown:
            continue
        throttled = Link(link.latency, link.per_connection, link.total, slowdown=0.05, seed=1)
        print("  with 5% of requests answered 503 SlowDown:", flush=True)
        slow = run(throttled, args.mib, args.repeats, only="torchstow", ops=ops)
        for op in ops:
            ratio = clean[f"{op} torchstow"] / slow[f"{op} torchstow"]
            print(
                f"    {op} torchstow: {ratio:5.2f}x of the same {op} without 503s (target >= 0.7x)",
                flush=True,
            )
    print(f"load average at the end: {_loadavg()}", flush=True)


def _cpu(medians: dict[str, float], op_name: str, nbytes: int) -> str:
    """The CPU seconds per GiB of each process during ``op_name``'s median run."""
    per_gib = {who: medians[f"{who} {op_name}"] * GiB / nbytes for who in ("server", "client", "proxy")}
    shown = [f"{who} {cpu:4.2f}" for who, cpu in per_gib.items() if cpu == cpu]  # (NaN: no proxy)
    return "CPU-s/GiB: " + ", ".join(shown)


def _own_cpu_seconds() -> float:
    """CPU seconds (user and system) this process, every thread of it, has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


if __name__ == "__main__":
    main()
