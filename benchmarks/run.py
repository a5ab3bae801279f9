"""Run the benchmarks, side by side with torch.distributed.checkpoint, and write JSON.

python benchmarks/run.py
    [--only local|dist|s3|async|dcp|shared|manage|plan|incremental|cache|mmap|readonce|encrypted|compression]
    [--repeats 3] [--root DIR] [--out FILE] [--plan-ranks 1024] [--plan-items 2000] [--plan-dcp-max-ranks 512]
    [--plan-plot docs/plan_scale.png] [--incremental-mib 1024] [--mmap-mib 1024] [--read-once-mib 512]
    [--read-once-tensors 16,1] [--encrypted-mib 256]

TORCHSTOW_BENCH_MANAGE_BYTES sets the size of the manage suite's checkpoint (default 1 GiB).
The encrypted suite needs the enc+ example installed (pip install ./examples/encrypted_store).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_async
import bench_compression
import bench_dcp_adapter
import bench_dist
import bench_encrypted
import bench_incremental
import bench_local
import bench_manage
import bench_mmap
import bench_plan_cache
import bench_plan_scale
import bench_read_once
import bench_s3
import bench_shared
from common import Report

SUITES = {
    "local": bench_local.main,
    "dist": bench_dist.main,
    "s3": bench_s3.main,
    "async": bench_async.main,
    "dcp": bench_dcp_adapter.main,
    "shared": bench_shared.main,
    "manage": bench_manage.main,
    "plan": bench_plan_scale.main,
    "incremental": bench_incremental.main,
    "cache": bench_plan_cache.main,
    "mmap": bench_mmap.main,
    "readonce": bench_read_once.main,
    "encrypted": bench_encrypted.main,
    "compression": bench_compression.main,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SUITES), action="append", help="run only these suites")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="directory for the checkpoints (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "latest.json"))
    parser.add_argument("--plan-ranks", type=int, default=1024, help="simulated ranks of the plan suite")
    parser.add_argument("--plan-items", type=int, default=2000, help="items per rank of the plan suite")
    parser.add_argument("--plan-plot", default=None, help="PNG for the plan suite's plot")
    parser.add_argument(
        "--plan-dcp-max-ranks", type=int, default=512, help="DCP runs up to this; extrapolated past it"
    )
    parser.add_argument(
        "--incremental-mib", type=int, default=1024, help="frozen MiB of the incremental suite"
    )
    parser.add_argument("--mmap-mib", type=int, default=1024, help="MiB the mmap suite reads")
    parser.add_argument(
        "--read-once-mib", type=int, default=512, help="MiB of the replicated state of the readonce suite"
    )
    parser.add_argument(
        "--read-once-tensors",
        default="16,1",
        help="tensor counts of the readonce suite's states (comma list)",
    )
    parser.add_argument("--encrypted-mib", type=int, default=256, help="MiB the encrypted suite saves")
    args = parser.parse_args()
    suites = dict(SUITES)
    suites["plan"] = functools.partial(
        bench_plan_scale.main,
        ranks=args.plan_ranks,
        items=args.plan_items,
        png=args.plan_plot,
        dcp_max_ranks=args.plan_dcp_max_ranks,
    )
    suites["incremental"] = functools.partial(bench_incremental.main, frozen_mib=args.incremental_mib)
    suites["mmap"] = functools.partial(bench_mmap.main, mib=args.mmap_mib)
    suites["readonce"] = functools.partial(
        bench_read_once.main,
        mib=args.read_once_mib,
        tensors=[int(n) for n in args.read_once_tensors.split(",")],
    )
    suites["encrypted"] = functools.partial(bench_encrypted.main, mib=args.encrypted_mib)
    report = Report("torchstow vs torch.distributed.checkpoint")
    with tempfile.TemporaryDirectory(dir=args.root, prefix="torchstow-bench-") as root:
        for name in args.only or list(SUITES):
            suites[name](root, args.repeats, report)
    report.write(args.out)


if __name__ == "__main__":
    main()
