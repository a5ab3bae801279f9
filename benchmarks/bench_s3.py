"""S3 through s3fs against a moto server: torchstow vs torch.distributed.checkpoint's
FsspecWriter/FsspecReader, and one plain s3fs object for reference, one process.

The moto server runs in its own process on 127.0.0.1 (as a real endpoint would,
not competing for this process's interpreter). Workload: 256 MiB of float32 in
16 tensors. Contenders run in interleaved rounds; each round deletes what it
wrote (untimed) so the server's memory stays flat; the report uses medians.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import torchstow

from common import Report, Result, assert_equal, large_state_dict, tensor_bytes, timed, zeros_like_state_dict

MiB = 1 << 20
BUCKET = "torchstow-bench"


# The server's allocator keeps freed blocks for the next ones, rather than returning each
# to the kernel and faulting in fresh zeroed pages for the next: moto copies every byte
# of a save about six times, and a ranged GET copies the whole object, each copy into new
# memory. One arena grown with brk, never mmap (a thread's own arena cannot hold a block
# over 64 MiB, so a 128 MiB object copied in a request's thread was mmapped afresh every
# time: one page fault per 4 KiB), blocks up to 32 MiB kept, the heap never trimmed.
_MALLOC = (
    f"glibc.malloc.mmap_threshold={32 << 20}:glibc.malloc.trim_threshold={4 << 30}"
    ":glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0"
)
# and its heap is grown once at start (``moto_s3.grow_heap``) by as much as a 1 GiB save
# takes of it, so the first save does not pay the page faults that every later one is spared
_HEAP = 3 << 30
_PIDS: dict[str, int] = {}  # the server process behind each endpoint moto_server yields


def server_cpu_seconds(endpoint: str) -> float:
    """CPU seconds (user and system) the moto server behind ``endpoint`` has used so far
    (Linux's /proc; NaN where there is none)."""
    return cpu_seconds(_PIDS.get(endpoint))


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user and system) process ``pid`` has used so far (Linux's /proc; NaN
    where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def moto_server() -> Iterator[str]:
    """The tests' moto S3 server (``tests/moto_s3.py``: moto's own application) in a child
    process, its allocator tuned (:data:`_MALLOC`); yields its endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "moto_s3.py")
    proc = subprocess.Popen(
        [sys.executable, server, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "GLIBC_TUNABLES": _MALLOC, "MOTO_S3_GROW_HEAP": str(_HEAP)},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        _PIDS[endpoint] = proc.pid
        yield endpoint
    finally:
        _PIDS.pop(f"http://127.0.0.1:{port}", None)
        proc.terminate()
        proc.wait(timeout=30)


def packed_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    """The bytes of the flat state dict ``sd``'s tensors back to back, in its order: the
    body of the one-object contenders (a whole state dict as one S3 object)."""
    return b"".join(t.numpy().tobytes() for t in sd.values())


def unpack_into(target: dict[str, torch.Tensor], data: Any) -> None:
    """Fill ``target``'s tensors from ``data`` (a buffer), laid out as :func:`packed_bytes` lays them."""
    view, pos = memoryview(data), 0
    for t in target.values():
        n = t.numel() * t.element_size()
        t.view(-1).view(torch.uint8).copy_(torch.frombuffer(view[pos : pos + n], dtype=torch.uint8))
        pos += n


@dataclass
class Contender:
    """``save(sd, url)``, ``load(target, url)`` and ``remove(url)`` for one way of using S3."""

    name: str
    save: Callable[[Any, str], Any]
    load: Callable[[Any, str], Any]
    remove: Callable[[str], Any]


def contenders(endpoint: str) -> list[Contender]:
    import s3fs

    creds = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(**creds, skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)

    def rm(url: str) -> None:
        if fs.exists(url):
            fs.rm(url, recursive=True)

    def one_object_save(sd: Any, url: str) -> None:
        # The bytes of every tensor as one object: the speed of a single s3fs upload.
        fs.pipe_file(url, packed_bytes(sd))

    def one_object_load(target: Any, url: str) -> None:
        unpack_into(target, fs.cat_file(url))

    def dcp_save(threads: int) -> Callable[[Any, str], Any]:
        return lambda sd, url: dcp.save(
            sd, storage_writer=FsspecWriter(url, thread_count=threads, **creds), no_dist=True
        )

    return [
        Contender(
            "torchstow",
            lambda sd, url: torchstow.save(sd, url, storage_options=creds),
            lambda sd, url: torchstow.load(sd, url, storage_options=creds),
            lambda url: torchstow.delete(url, storage_options=creds),
        ),
        Contender(
            "dcp fsspec t=1",
            dcp_save(1),
            lambda sd, url: dcp.load(sd, storage_reader=FsspecReader(url, **creds), no_dist=True),
            rm,
        ),
        Contender(
            "dcp fsspec t=4",
            dcp_save(4),
            lambda sd, url: dcp.load(sd, storage_reader=FsspecReader(url, **creds), no_dist=True),
            rm,
        ),
        Contender("s3fs one object", one_object_save, one_object_load, rm),
    ]


def main(root: str, repeats: int, report: Report) -> None:
    """Save and load 256 MiB to moto S3 with each contender; record the torchstow/DCP ratios."""
    print("S3 (moto server on 127.0.0.1, s3fs), single process", flush=True)
    sd = large_state_dict(256 * MiB, 16)
    nbytes = tensor_bytes(sd)
    with moto_server() as endpoint:
        cs = contenders(endpoint)
        saves: dict[str, list[float]] = {c.name: [] for c in cs}
        loads: dict[str, list[float]] = {c.name: [] for c in cs}
        targets = {c.name: zeros_like_state_dict(sd) for c in cs}
        for _ in range(repeats):
            for c in cs:
                url = f"s3://{BUCKET}/{c.name.replace(' ', '-').replace('=', '')}-{uuid.uuid4().hex[:8]}"
                saves[c.name] += timed(lambda c=c, url=url: c.save(sd, url), 1)
                loads[c.name] += timed(lambda c=c, url=url: c.load(targets[c.name], url), 1)
                c.remove(url)
    for target in targets.values():
        assert_equal(sd, target)
    results = {}
    for c in cs:
        results[f"save {c.name}"] = report.add(Result("s3-256MiB", "save", c.name, saves[c.name], nbytes))
        results[f"load {c.name}"] = report.add(Result("s3-256MiB", "load", c.name, loads[c.name], nbytes))
    for op in ("save", "load"):
        mib_s = {c.name: nbytes / MiB / results[f"{op} {c.name}"].median for c in cs}
        print(f"  {op} MiB/s: " + ", ".join(f"{name} {v:.0f}" for name, v in mib_s.items()), flush=True)
    dcp_names = ["dcp fsspec t=1", "dcp fsspec t=4"]
    report.ratio(
        "s3 save vs DCP best", results["save torchstow"], [results[f"save {n}"] for n in dcp_names], 1.5
    )
    report.ratio(
        "s3 load vs DCP best", results["load torchstow"], [results[f"load {n}"] for n in dcp_names], 1.5
    )
    del root  # S3 needs no local directory
