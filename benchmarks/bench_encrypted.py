"""The ``enc+`` wrapper example's overhead: ``enc+file://`` vs ``file://``, ``enc+shm://`` vs ``shm://``.

Workload: ``mib`` MiB of float32 in 16 MiB tensors, saved and loaded synchronously in
one process. Contenders run in interleaved rounds; each save starts from a removed
checkpoint (and ``os.sync()``), each load fills a preallocated state dict right after
the saves (page cache / RAM) and is compared bit for bit. The ratio is the wrapped
median time / the unwrapped one (1.00x = no overhead; lower is better). The wrapped
backends run with the example's default block (1 MiB) and with 4 MiB blocks.

Needs the example installed: ``pip install ./examples/encrypted_store`` (its key is
given here as the storage option ``enc.key``).

python benchmarks/bench_encrypted.py [--mib 256] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import torchstow
from torchstow.backends.shm import default_shm_dir
from torchstow.errors import CheckpointNotFoundError

from common import Report, Result, assert_equal, large_state_dict, zeros_like_state_dict

MiB = 1 << 20
KEY = "5a" * 32  # a fixed benchmark key: the timings do not depend on it


def _contenders(root: str, shm_name: str) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Name -> (URI, storage options); the shm ones under the shm name ``shm_name``."""
    shm = f"shm://{shm_name}"
    enc = {"enc.key": KEY}
    large = {**enc, "enc.block_size": 4 * MiB}
    return {
        "file": (f"file://{root}/enc-bench-plain", None),
        "enc+file": (f"enc+file://{root}/enc-bench-enc", enc),
        "enc+file 4MiB blocks": (f"enc+file://{root}/enc-bench-enc-4m", large),
        "shm": (f"{shm}/plain", None),
        "enc+shm": (f"enc+{shm}/enc", enc),
        "enc+shm 4MiB blocks": (f"enc+{shm}/enc-4m", large),
    }


def _remove(uri: str, options: dict[str, Any] | None) -> None:
    """Delete the checkpoint at ``uri`` if there is one, then ``os.sync()``."""
    with contextlib.suppress(CheckpointNotFoundError):
        torchstow.delete(uri, storage_options=options)
    os.sync()


def _rounds(
    names: list[str], repeats: int, run: Callable[[str], None], before: Callable[[str], None]
) -> dict[str, list[float]]:
    """``repeats`` interleaved rounds of ``run(name)`` (rotated order), ``before`` untimed."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            before(name)
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
    return times


def _ensure_plugin() -> None:
    try:
        import torchstow_enc  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "bench_encrypted needs the enc+ example: pip install ./examples/encrypted_store"
        ) from exc


def main(root: str, repeats: int, report: Report, mib: int = 256) -> None:
    """Save and load ``mib`` MiB through each contender; ratios wrapped / unwrapped."""
    _ensure_plugin()
    print(f"encrypted: {mib} MiB of float32, enc+ wrapper vs the unwrapped backend", flush=True)
    sd = large_state_dict(mib * MiB, max(1, mib // 16))
    target = zeros_like_state_dict(sd)
    shm_name = f"torchstow-bench-enc-{uuid.uuid4().hex[:8]}"
    contenders = _contenders(root, shm_name)
    names = list(contenders)
    workload = f"enc {mib}MiB"
    try:
        saves = _rounds(
            names,
            repeats,
            run=lambda n: torchstow.save(sd, contenders[n][0], storage_options=contenders[n][1]),
            before=lambda n: _remove(*contenders[n]),
        )

        def load(name: str) -> None:
            torchstow.load(target, contenders[name][0], storage_options=contenders[name][1])
            assert_equal(target, sd)

        def clear(_: str) -> None:
            for t in target.values():
                t.zero_()

        # assert_equal is inside the timed call; it costs every contender alike
        loads = _rounds(names, repeats, run=load, before=clear)
    finally:
        for uri, options in contenders.values():
            _remove(uri, options)
        shutil.rmtree(os.path.join(default_shm_dir(), shm_name), ignore_errors=True)
    for op, times in (("save", saves), ("load", loads)):
        results = {n: report.add(Result(workload, op, n, t, mib * MiB)) for n, t in times.items()}
        for name in names:
            if name.startswith("enc+"):
                base = name.split()[0].removeprefix("enc+")
                overhead = results[name].median / results[base].median
                report.ratios[f"{name} {op} {mib} MiB / {base}"] = overhead
                print(f"  ratio {name} {op} / {base} (time, lower is better) {overhead:6.2f}x", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="MiB of float32 to save and load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="directory for the file:// checkpoints")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args()
    bench_report = Report("enc+ wrapper vs the unwrapped backend")
    with tempfile.TemporaryDirectory(dir=args.root, prefix="torchstow-bench-") as tmp:
        main(tmp, args.repeats, bench_report, mib=args.mib)
    if args.out:
        bench_report.write(args.out)
