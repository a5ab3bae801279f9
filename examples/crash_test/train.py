"""A training loop to crash-test from outside with ckpt-chaos (see docs/distributed.md,
"Crash testing from outside"): 2-4 gloo ranks, one torchstow save every step.

usage (one process per rank, RANK / WORLD_SIZE / MASTER_* set, as ckpt-chaos --ranks does):
  python train.py MODE OUT [--lose-fast]
MODE: sync | async | incr | zstd | tiered
  sync   torchstow.save every step
  async  torchstow.async_save every step (one in flight; the last waited for)
  incr   torchstow.save(base=previous step): the frozen per-rank tensors are shared
  zstd   torchstow.save(compression="zstd")
  tiered CheckpointManager(root=OUT/root, fast=OUT-fast/{node}), every rank its own node,
         replicas=1, persist_every=1: the fast tier lies outside OUT, so every file event
         ckpt-chaos counts (and kills at) is one of the persist to the root.
  tiered-fast  the same with the fast tier under OUT (OUT/fast/{node}): crashes in the fast
         save, replication, fast-tier pruning and persist; the resume keeps the fast tiers
  overwrite  torchstow.save(OUT/last, overwrite=True) every step (one location, replaced)
--lose-fast (resume of tiered): this rank's node loses its fast tier first, so the restore
  comes from the root.
State per rank: a replicated weight and momentum (written once), a per-rank tensor that
changes every step, a frozen per-rank tensor, the step. final.pt (rank 0) holds every
rank's state after step 3, gathered.
"""

import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import torchstow

mode, out = sys.argv[1], sys.argv[2]
lose_fast = "--lose-fast" in sys.argv[3:]
STEPS = 3


def terminate(signum, frame):  # what torchelastic and most training scripts do on SIGTERM
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, terminate)
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
if mode.startswith("tiered"):
    os.environ["TORCHSTOW_NODE"] = str(rank)  # each rank a node of its own: replicas travel
dist.init_process_group("gloo")
if rank == 0:  # one rank makes OUT, so every run numbers the file events alike
    os.makedirs(out, exist_ok=True)
dist.barrier()
world = dist.get_world_size()


def initial():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=gen)
    m = torch.zeros(128, 128)
    gen_r = torch.Generator().manual_seed(100 + rank)
    local = torch.randn(32768, generator=gen_r)
    frozen = torch.randn(32768, generator=gen_r)
    return {"w": w, "m": m, f"rank{rank}": local, f"frozen{rank}": frozen, "step": 0}


def train_step(state, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 128, generator=gen)
    grad = x.T @ (x @ state["w"]) / 16
    state["m"].mul_(0.9).add_(grad)
    state["w"].sub_(0.01 * state["m"])
    gen_r = torch.Generator().manual_seed(1000 * step + rank)
    state[f"rank{rank}"].mul_(0.5).add_(torch.randn(32768, generator=gen_r))
    state["step"] = step


state = initial()
start = 0
manager = None
if mode.startswith("tiered"):
    fast = f"{out}-fast" if mode == "tiered" else f"{out}/fast"
    if lose_fast:
        shutil.rmtree(f"{fast}/{rank}", ignore_errors=True)
    if rank == 0:  # else whichever rank first finds it missing makes the root (its event count shifts)
        os.makedirs(f"{out}/root", exist_ok=True)
    dist.barrier()
    manager = torchstow.CheckpointManager(
        f"{out}/root", fast=fast + "/{node}", replicas=1, persist_every=1, fast_keep=2
    )
    if manager.latest_step() is not None:
        start = manager.restore(state)
elif mode == "overwrite":
    if os.path.exists(f"{out}/last/manifest.json"):
        torchstow.load(state, f"{out}/last", timeout=60)
        start = state["step"]
else:
    last = torchstow.latest(out) if os.path.isdir(out) and os.listdir(out) else None
    if last is not None:
        torchstow.load(state, last, timeout=60)
        start = state["step"]
        assert last.endswith(f"step-{start}"), (last, start)
print(f"resumed at step {start}", flush=True)

pending = None
for step in range(start + 1, STEPS + 1):
    train_step(state, step)
    uri = f"{out}/step-{step}"
    if mode == "sync":
        torchstow.save(state, uri, timeout=60)
    elif mode == "zstd":
        torchstow.save(state, uri, timeout=60, compression="zstd")
    elif mode == "incr":
        base = f"{out}/step-{step - 1}" if step > 1 else None
        torchstow.save(state, uri, timeout=60, base=base)
    elif mode == "async":
        if pending is not None:
            pending.result()
        pending = torchstow.async_save(state, uri, timeout=60)
    elif mode == "overwrite":
        torchstow.save(state, f"{out}/last", timeout=60, overwrite=True)
    elif mode.startswith("tiered"):
        manager.save(step, state)
    else:
        raise SystemExit(f"unknown mode {mode}")
if pending is not None:
    pending.result()
if manager is not None:
    manager.close()

gathered = [None] * world
dist.all_gather_object(gathered, {k: v for k, v in state.items() if k.startswith(("rank", "frozen"))})
if rank == 0:
    final = {"w": state["w"], "m": state["m"], "step": state["step"]}
    for part in gathered:
        final.update(part)
    torch.save(final, f"{out}/final.pt")
dist.barrier()
dist.destroy_process_group()
