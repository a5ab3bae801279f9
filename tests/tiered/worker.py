"""A torchrun worker for the tiered tests: ``worker.py MODE OUT ROOT FAST [STEPS...]``.

MODE ``save`` saves the given steps and records the levels each step reported;
``restore`` restores (the newest step, or the one given) and records the step,
whether every value is exact and the bytes read from the root; ``restore-then-save``
restores the newest, then saves; ``kill-fast``, ``kill-replication`` and
``kill-persist`` save the given steps and SIGKILL this process (on global rank
``TIERED_KILL_RANK``) in the middle of that phase of the last one.
``restore`` takes comma-separated ROOTs and FASTs: one manager (and one record in
``runs``) for each pair, in one launch (``TIERED_CUT_BEFORE_RUN=K:PATH`` cuts a file
short between two of them). Every ROOT is opened as ``count+file://ROOT``,
which counts each byte read from it (:mod:`torchstow.testing.counting`).
Values depend on the step only, so any world size can check them.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torchstow.management import manager as plain_manager
from torchstow.management.tiered import LEVELS
from torchstow.management.tiered import manager as tiered
from torchstow.testing.counting import bytes_read, install_counting

ROWS = 48  # divisible by every world size used


def full(step: int) -> torch.Tensor:
    return torch.arange(ROWS * 5, dtype=torch.float32).reshape(ROWS, 5) * (step + 1) + step / 7


def state(step: int, mesh) -> dict:
    return {
        "sharded": distribute_tensor(full(step), mesh, [Shard(0)]),
        "replicated": torch.full((64,), float(step), dtype=torch.float64),
        "step_seen": step,
    }


def exact(sd: dict, step: int) -> bool:
    ref = state(step, sd["sharded"].device_mesh)
    return (
        torch.equal(sd["sharded"].to_local(), ref["sharded"].to_local())
        and torch.equal(sd["replicated"], ref["replicated"])
        and sd["step_seen"] == step
    )


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(mode: str) -> None:
    """Make this rank SIGKILL itself in the middle of the phase ``mode`` names (last step only)."""
    if dist.get_rank() != int(os.environ["TIERED_KILL_RANK"]):
        return
    last = os.environ["TIERED_KILL_STEP"]
    if mode == "kill-fast":  # its data files written, the step not committed anywhere
        original = tiered._FilesWriter.write_data

        def write_data(self, plan, planner):
            result = original(self, plan, planner)
            if self.store.location.endswith(f"step-{last}"):
                die()
            return result

        tiered._FilesWriter.write_data = write_data
    elif mode == "kill-replication":  # half of a received replica file written

        def write(store, name, data):
            if store.location.endswith(f"step-{last}"):
                sink = store.create(name)
                sink.write([memoryview(data.numpy()[: len(data) // 2])])
                die()
            original_write(store, name, data)

        original_write = tiered._write
        tiered._write = write
    elif mode == "kill-persist":  # one data file copied to the root, no manifest there
        original_copy = tiered._copy_checked

        def copy(source, target, name, spans):
            original_copy(source, target, name, spans)
            if target.location.endswith(f"step-{last}"):
                die()

        tiered._copy_checked = copy


def main() -> None:
    mode, out, roots, fasts, *steps = sys.argv[1:]
    dist.init_process_group("gloo")
    install_counting()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    persist_every = int(os.environ.get("TIERED_PERSIST_EVERY", "1"))
    if mode.startswith("kill-"):
        arm(mode)
    runs = []
    cut = os.environ.get("TIERED_CUT_BEFORE_RUN")  # "K:PATH": cut file PATH short before run K
    for k, (root, fast) in enumerate(zip(roots.split(","), fasts.split(","), strict=True)):
        if cut and int(cut.split(":", 1)[0]) == k:
            if dist.get_rank() == 0:
                path = cut.split(":", 1)[1]
                os.truncate(path, os.path.getsize(path) // 2)
            dist.barrier()
        manager = plain_manager.CheckpointManager(
            f"count+file://{root}", fast=fast, persist_every=persist_every, replicas=1
        )
        run: dict = {"node": manager._tiered.node}
        if mode in ("restore", "restore-then-save"):
            target = state(0, mesh)
            target["sharded"] = distribute_tensor(torch.zeros(ROWS, 5), mesh, [Shard(0)])
            target["replicated"] = torch.zeros(64, dtype=torch.float64)
            target["step_seen"] = -1
            asked = int(steps[0]) if mode == "restore" and steps else None
            before = bytes_read()
            step = manager.restore(target, asked)
            run.update(restored=step, exact=exact(target, step), root_read=bytes_read() - before)
        if mode in ("save", "restore-then-save") or mode.startswith("kill-"):
            seen = {}
            for step in map(int, steps):
                handle = manager.save(step, state(step, mesh))
                levels = [handle.level]
                for level in LEVELS[1:]:
                    handle.wait(level)
                    levels.append(handle.level)
                    if level == handle.due:
                        break
                seen[step] = {"levels": levels, "stats": list(handle.stats), "due": handle.due}
            run["saved"] = seen
        manager.close()
        run["steps"] = [[i.step, list(i.tiers)] for i in manager.steps()]
        runs.append(run)
    record = {"rank": dist.get_rank(), **runs[0], "runs": runs}
    with open(os.path.join(out, f"rank-{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
