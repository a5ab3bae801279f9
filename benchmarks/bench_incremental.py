"""Fine-tuning: the second save of a model whose large part is frozen, with base= or without.

Workload: ``frozen`` MiB of frozen float32 weights (16 MiB tensors), a
trainable part of 1/64 of that (4 MiB tensors) and its AdamW state, as
``{"model": model.state_dict(), "optim": optimizer.state_dict()}``. Each
round saves step 1 (untimed), takes an optimizer step, then times the
second save five ways, in rotating order: torchstow with ``base=`` step 1
(a plain save: its digests are computed from its files), torchstow with
``base=`` a checkpoint that recorded digests (the steady state of a run that
always saves with ``base=``), the same with ``trust_version_counter=True``
(the digests of tensors unchanged by their version counter since the save of
step 2, made in this process with the flag, are reused: the frozen weights are
not read), torchstow without, and DCP (which has no incremental save). Every save is
synced to disk. Bytes written: torchstow's ``info().nbytes_written``, the
size of DCP's files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import torchstow

from common import Report, Result, fresh_dir

MiB = 1 << 20


class FineTuned(torch.nn.Module):
    """Frozen 16 MiB weights and trainable 4 MiB ones."""

    def __init__(self, frozen_mib: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        rows = 16 * MiB // 4 // 1024
        self.frozen = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rows, 1024, generator=gen), requires_grad=False)
            for _ in range(frozen_mib // 16)
        )
        trainable = max(1, frozen_mib // 64 // 4)
        self.adapters = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rows // 4, 1024, generator=gen)) for _ in range(trainable)
        )


def _step(model: FineTuned, optimizer: torch.optim.Optimizer) -> None:
    for p in model.adapters:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()


def _dir_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def _contenders(root: str) -> dict[str, Callable[[Any], int]]:
    base = os.path.join(root, "step-1")

    def incremental(sd: Any) -> int:
        path = os.path.join(root, "inc")
        torchstow.save(sd, path, base=base)
        return torchstow.info(path).nbytes_written

    def steady(sd: Any) -> int:
        path = os.path.join(root, "steady")
        torchstow.save(sd, path, base=os.path.join(root, "step-2"))
        return torchstow.info(path).nbytes_written

    def trusted(sd: Any) -> int:
        path = os.path.join(root, "trusted")
        torchstow.save(sd, path, base=os.path.join(root, "step-2"), trust_version_counter=True)
        return torchstow.info(path).nbytes_written

    def full(sd: Any) -> int:
        path = os.path.join(root, "full")
        torchstow.save(sd, path)
        return torchstow.info(path).nbytes_written

    def dcp_save(sd: Any) -> int:
        path = os.path.join(root, "dcp")
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path))
        return _dir_bytes(path)

    return {
        "torchstow base=": incremental,
        "torchstow base= digested": steady,
        "torchstow base= trusted": trusted,
        "torchstow full": full,
        "dcp": dcp_save,
    }


def main(root: str, repeats: int, report: Report, frozen_mib: int = 1024) -> None:
    """Time the second save each way; record time and byte ratios."""
    print(f"incremental: {frozen_mib} MiB frozen + {frozen_mib // 64} MiB trainable + AdamW", flush=True)
    contenders = _contenders(root)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    written: dict[str, int] = {}
    total = 0
    for round_ in range(repeats):
        model = FineTuned(frozen_mib)
        optimizer = torch.optim.AdamW([p for p in model.adapters])
        _step(model, optimizer)
        for name in ("step-1", "step-2", "inc", "steady", "trusted", "full", "dcp"):
            fresh_dir(os.path.join(root, name))
        first = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        torchstow.save(first, os.path.join(root, "step-1"))
        # step 2 (same values) as an incremental save too, so it records digests (in its
        # manifest, and in this process for the trusting contender)
        step_2 = os.path.join(root, "step-2")
        torchstow.save(first, step_2, base=os.path.join(root, "step-1"), trust_version_counter=True)
        _step(model, optimizer)
        sd = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        total = torchstow.info(os.path.join(root, "step-1")).nbytes
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            os.sync()
            start = time.perf_counter()
            written[name] = contenders[name](sd)
            times[name].append(time.perf_counter() - start)
    results = {
        name: report.add(Result(f"finetune {frozen_mib}MiB", "save2", name, t, total))
        for name, t in times.items()
    }
    for name, nbytes in written.items():
        report.ratios[f"finetune bytes written, {name} / total"] = nbytes / total
        print(f"  finetune {name:<18} wrote {nbytes / MiB:9.1f} MiB of {total / MiB:.1f} MiB", flush=True)
    report.ratio(
        "finetune 2nd save: base= vs full torchstow",
        results["torchstow base="],
        [results["torchstow full"]],
        10.0,
    )
    report.ratio("finetune 2nd save: base= vs DCP", results["torchstow base="], [results["dcp"]], 10.0)
    digested = results["torchstow base= digested"]
    report.ratio("finetune later save: base= (digested) vs full", digested, [results["torchstow full"]], 10.0)
    report.ratio("finetune later save: base= (digested) vs DCP", digested, [results["dcp"]], 10.0)
    trusted = results["torchstow base= trusted"]
    report.ratio("finetune later save: base= trusted vs full", trusted, [results["torchstow full"]], 10.0)
    report.ratio("finetune later save: base= trusted vs DCP", trusted, [results["dcp"]], 10.0)
