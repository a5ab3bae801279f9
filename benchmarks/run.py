"""Run the benchmarks, side by side with torch.distributed.checkpoint, and write JSON.

python benchmarks/run.py [--only local|dist|s3|async|dcp|shared|manage] [--repeats 3]
                         [--root DIR] [--out FILE]

TORCHSTOW_BENCH_MANAGE_BYTES sets the size of the manage suite's checkpoint (default 1 GiB).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_async
import bench_dcp_adapter
import bench_dist
import bench_local
import bench_manage
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
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SUITES), action="append", help="run only these suites")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="directory for the checkpoints (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "latest.json"))
    args = parser.parse_args()
    report = Report("torchstow vs torch.distributed.checkpoint")
    with tempfile.TemporaryDirectory(dir=args.root, prefix="torchstow-bench-") as root:
        for name in args.only or list(SUITES):
            SUITES[name](root, args.repeats, report)
    report.write(args.out)


if __name__ == "__main__":
    main()
