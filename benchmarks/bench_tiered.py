"""Tiered checkpoints: 2 simulated nodes x 2 ranks (torchrun agents, c10d on 127.0.0.1).

Side by side, in one run:

- **save**: the time a ``save`` blocks the training loop, against a plain copy of the same
  tensors into preallocated shared memory (target <= 1.3x); all ranks start each copy and
  each save together (a barrier). The first save allocates its staging buffers and is
  reported apart; the ratio is for the saves after it. Between saves the loop waits until
  the step's background work (write, replication, pruning) is over, as a training step of
  some length would let it be.
- **restore**: from the fast tiers; in a restarted job after wiping one node's fast tier
  (from the replica); and from the root after wiping every fast tier (a local directory,
  or S3 on a moto server with ``--s3``); and DCP's load (``FsspecReader``) of the same
  state, saved by DCP beside the root (``<root>-dcp``: the same bucket). The root is
  opened as ``count+<root>`` (:mod:`torchstow.testing.counting`): every byte read from it
  is counted and reported. Target: fast and replica >= 10x faster than the root, and 0
  bytes read from the root by the replica restore.
- **loop** (``--only loop``): 2 ranks on one node, model + AdamW state of ``--loop-mib``,
  40 steps of ``--step-seconds``: without checkpoints, tiered (every step, persisted every
  10) and the second-wave manager (asynchronous, every 10); target <= 1.25x the loop alone.

``--figure`` also draws docs/tiered_timeline.png: one persisted save through its levels
on rank 0 (from ``TieredSave.stats``).

python benchmarks/bench_tiered.py --size-mib 1024 [--s3] [--only save,restore,loop] [--figure]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gloo_ranks import free_port

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MiB = 1 << 20


# -- the parent: torchrun agents -------------------------------------------------------------


def run_job(work: Path, name: str, args: list[str], nnodes: int = 2, nproc: int = 2) -> dict[int, dict]:
    """Run the child ``args`` on ``nnodes`` torchrun agents of ``nproc`` ranks; each rank's record."""
    out = work / name
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0",
        str(Path(__file__).resolve()), "--child", str(out), *args,
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out / f"agent-{k}.log", "w")) for k in range(nnodes)]
        agents = [subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        codes = [agent.wait() for agent in agents]
    if any(codes):
        tail = "\n".join(p.read_text()[-3000:] for p in sorted(out.glob("agent-*.log")))
        raise RuntimeError(f"job {name} failed ({codes}):\n{tail}")
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in out.glob("rank-*.json")}


# -- the child: one rank ---------------------------------------------------------------------


def _state(mib: int, rank: int, salt: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(rank * 1000 + salt)
    rows = max(1, mib * MiB // 16 // 4 // 1024)
    return {f"rank{rank}.layer{i}": torch.randn(rows, 1024, generator=gen) for i in range(16)}


def child(out: str, case: str, root: str, fast: str, mib: int, repeats: int, extra: list[str]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torchstow import CheckpointManager

    record: dict[str, Any] = {"rank": rank}
    options = json.loads(extra[0]) if extra and extra[0] != "null" else None
    dcp_root = extra[1] if case in ("save", "restore-dcp") and len(extra) > 1 else None
    per_rank = mib // world
    if case == "save":
        state = _state(per_rank, rank, 0)
        copies = []
        shm = {k: torch.empty_like(v).share_memory_() for k, v in state.items()}
        for _ in range(repeats):
            dist.barrier()  # all ranks copy at once, as all ranks save at once below
            started = time.perf_counter()
            for k, v in state.items():
                shm[k].copy_(v)
            copies.append(time.perf_counter() - started)
        manager = CheckpointManager(root, fast=fast, persist_every=repeats, storage_options=options)
        blocked, stats = [], {}
        for step in range(1, repeats + 1):
            for v in state.values():
                v.add_(1.0)  # a training step
            dist.barrier()
            started = time.time()
            handle = manager.save(step, state)
            blocked.append(time.time() - started)
            manager.wait(handle.due)  # the step's background work, its pruning included, is over
            stats = {"started": started, **{k: vars(v) for k, v in handle.stats.items()}}
        manager.close()
        record.update(copy=copies, blocked=blocked, stats=stats, nbytes=per_rank * MiB)
        if dcp_root is not None:  # the same state as a DCP checkpoint, for DCP's load
            dcp.save(state, storage_writer=FsspecWriter(dcp_root, **(options or {})))
    elif case == "restore":
        from torchstow.testing.counting import bytes_read, install_counting

        install_counting()
        counted = f"count+{root}" if "://" in root else f"count+file://{root}"
        target = {k: torch.zeros_like(v) for k, v in _state(per_rank, rank, 0).items()}
        manager = CheckpointManager(counted, fast=fast, storage_options=options)
        dist.barrier()
        started = time.perf_counter()
        step = manager.restore(target)
        record.update(seconds=time.perf_counter() - started, step=step, root_read=bytes_read())
        manager.close()
    elif case == "restore-dcp":
        target = {k: torch.zeros_like(v) for k, v in _state(per_rank, rank, 0).items()}
        dist.barrier()
        started = time.perf_counter()
        dcp.load(target, storage_reader=FsspecReader(dcp_root, **(options or {})))
        record.update(seconds=time.perf_counter() - started)
    elif case == "loop":
        record.update(loop(root, fast, mib, float(extra[1]), extra[2], options))
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


def loop(root: str, fast: str, mib: int, step_seconds: float, how: str, options: Any) -> dict[str, Any]:
    """40 steps of a model + AdamW state of ``mib`` per rank; total seconds."""
    import torch
    import torch.distributed as dist

    from torchstow import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(1024, 1024) for _ in range(max(1, mib * MiB // 3 // 4 // MiB))]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(8, 1024)
    manager: Any = None
    if how == "tiered":
        manager = CheckpointManager(root, fast=fast, persist_every=10, storage_options=options)
    elif how == "plain":
        manager = CheckpointManager(root, storage_options=options)
    dist.barrier()
    blocked = []
    started = time.perf_counter()
    for step in range(1, 41):
        step_started = time.perf_counter()
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        save_started = time.perf_counter()
        if how == "tiered":
            manager.save(step, state)
        elif how == "plain" and step % 10 == 0:
            manager.save(step, state, asynchronous=True)
        blocked.append(time.perf_counter() - save_started)
        time.sleep(max(0.0, step_seconds - (time.perf_counter() - step_started)))  # the rest of a step
    if manager is not None:
        manager.close()
    return {"seconds": time.perf_counter() - started, "blocked": blocked}


# -- the figure --------------------------------------------------------------------------------


def draw(stats: dict[str, Any], path: Path) -> None:
    """One save's levels on a time line (seconds after ``save`` was called)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = stats["started"]
    levels = [level for level in ("staged", "fast", "replicated", "durable") if level in stats]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    colors = {"staged": "#4c72b0", "fast": "#55a868", "replicated": "#c44e52", "durable": "#8172b2"}
    for y, level in enumerate(levels):
        end = stats[level]["ended_at"] - t0
        start = end - stats[level]["seconds"]
        ax.barh(y, end - start, left=start, color=colors[level])
        ax.text(end, y, f"  {level} ({stats[level]['bytes'] / MiB:.0f} MiB)", va="center", fontsize=8)
    ax.axvline(stats["staged"]["ended_at"] - t0, color="black", lw=0.8, ls="--")
    ax.text(stats["staged"]["ended_at"] - t0, len(levels) - 0.4, " save() returns", fontsize=8)
    ax.set_yticks(range(len(levels)), levels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds after save() was called (rank 0)")
    ax.set_title("One tiered save through its levels (2 nodes x 2 ranks on one machine)", fontsize=9)
    ax.set_xlim(0, (stats[levels[-1]]["ended_at"] - t0) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- main ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def root_store(s3: bool, work: Path) -> Any:
    """The durable root (a local directory, or a bucket on a moto server) and its options."""
    if not s3:
        yield str(work / "root"), None
        return
    from bench_s3 import moto_server

    with moto_server() as endpoint:
        import s3fs

        options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
        s3fs.S3FileSystem(**options).mkdir("tiered-bench")
        yield "s3://tiered-bench/run", options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs="+")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-mib", type=int, default=256)
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--only", default="save,restore")
    parser.add_argument("--s3", action="store_true")
    parser.add_argument("--figure", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/tiered.json")
    args = parser.parse_args()
    if args.child:
        out, case, root, fast, mib, repeats, *extra = args.child
        child(out, case, root, fast, int(mib), int(repeats), extra)
        return
    only = set(args.only.split(","))
    results: dict[str, Any] = {"size_mib": args.size_mib}
    work = Path(tempfile.mkdtemp(prefix="bench-tiered-"))
    fast_name = f"bench-tiered-{os.getpid()}"
    fast = f"shm://{fast_name}/{{node}}"
    from torchstow.backends.shm import default_shm_dir

    fast_dir = Path(default_shm_dir()) / fast_name
    try:
        with root_store(args.s3, work) as (root, options):
            common = [root, fast, str(args.size_mib), str(args.repeats), json.dumps(options), root + "-dcp"]
            if only & {"save", "restore"}:
                records = run_job(work, "save", ["save", *common])
                copy = statistics.median(statistics.median(r["copy"]) for r in records.values())
                first = statistics.median(r["blocked"][0] for r in records.values())
                later = [r["blocked"][1:] or r["blocked"] for r in records.values()]  # buffers reused
                blocked = statistics.median(statistics.median(b) for b in later)
                results["save"] = {
                    "blocked_s": blocked,
                    "first_blocked_s": first,
                    "shm_copy_s": copy,
                    "ratio": blocked / copy,
                    "first_ratio": first / copy,
                    "per_rank": {
                        r: {"blocked": rec["blocked"], "copy": rec["copy"]} for r, rec in records.items()
                    },
                }
                print(f"save: blocked {blocked:.4f}s (the first save {first:.4f}s: allocating), copy "
                      f"{copy:.4f}s: {blocked / copy:.2f}x (<= 1.3), first {first / copy:.2f}x")  # fmt: skip
                if args.figure:
                    draw(records[0]["stats"], HERE.parent / "docs" / "tiered_timeline.png")
            if "restore" in only:
                times, root_read = {}, {}
                times["fast"], root_read["fast"] = _restore(work, "restore-fast", common)
                shutil.rmtree(fast_dir / "1")
                times["replica"], root_read["replica"] = _restore(work, "restore-replica", common)
                shutil.rmtree(fast_dir)
                times["root"], root_read["root"] = _restore(work, "restore-root", common)
                records = run_job(work, "restore-dcp", ["restore-dcp", *common])
                times["dcp"] = max(r["seconds"] for r in records.values())
                results["restore"] = {
                    **{f"{k}_s": v for k, v in times.items()},
                    "root_bytes_read": root_read,
                    "root_over_fast": times["root"] / times["fast"],
                    "root_over_replica": times["root"] / times["replica"],
                    "dcp_over_fast": times["dcp"] / times["fast"],
                    "dcp_over_replica": times["dcp"] / times["replica"],
                }
                print(f"restore: {times}; root/fast {times['root'] / times['fast']:.1f}x, "
                      f"root/replica {times['root'] / times['replica']:.1f}x (>= 10); "
                      f"bytes read from the root: {root_read}")  # fmt: skip
            if "loop" in only:
                loops, loop_blocked = {}, {}
                for how in ("none", "tiered", "plain"):
                    shutil.rmtree(fast_dir, ignore_errors=True)
                    args_loop = [root + f"-loop-{how}", fast, str(args.loop_mib), "1", json.dumps(options)]
                    records = run_job(
                        work, f"loop-{how}", ["loop", *args_loop, str(args.step_seconds), how], 1
                    )
                    loops[how] = max(r["seconds"] for r in records.values())
                    loop_blocked[how] = statistics.median(b for r in records.values() for b in r["blocked"])
                results["loop"] = {
                    **loops,
                    "tiered_over_none": loops["tiered"] / loops["none"],
                    "median_blocked_per_step_s": loop_blocked,
                }
                print(f"loop: {loops}; tiered/none {loops['tiered'] / loops['none']:.2f}x (<= 1.25)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(fast_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


def _restore(work: Path, name: str, common: list[str]) -> tuple[float, int]:
    """The slowest rank's restore, and the bytes all ranks read from the root (counted)."""
    records = run_job(work, name, ["restore", *common])
    return max(r["seconds"] for r in records.values()), sum(r["root_read"] for r in records.values())


if __name__ == "__main__":
    main()
