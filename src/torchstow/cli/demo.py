"""``torchstow demo``: save a real model and optimizer, load them into fresh ones, compare bit for bit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

import torchstow
from torchstow.errors import CheckpointExistsError, CheckpointNotFoundError


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True),
        num_layers=6,
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optim


def _train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(4, 16, 512, generator=gen)).square().mean()
    loss.backward()
    optim.step()
    optim.zero_grad()


def _state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so NaNs and -0.0 compare bit for bit."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _mismatches(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{prefix}: keys differ"]
        return [m for k in a for m in _mismatches(a[k], b[k], f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(a, list | tuple):
        pairs = enumerate(zip(a, b, strict=True))
        return [m for i, (x, y) in pairs for m in _mismatches(x, y, f"{prefix}.{i}")]
    if isinstance(a, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw(a), _raw(b))
        return [] if same else [prefix]
    return [] if a == b else [prefix]


def demo(args: argparse.Namespace) -> int:
    """Train a small transformer a step, save model + optimizer, load into fresh ones, compare."""
    if args.path:
        return _demo(args.path)
    with tempfile.TemporaryDirectory(prefix="torchstow-demo-") as root:
        status = _demo(root)
        print(f"(removed {root}; pass --path DIR to keep the checkpoint)")
        return status


_NOTE = "torchstow demo"


def _demo(root: str) -> int:
    uri = os.path.join(root, "step-2")
    try:  # a checkpoint there that an earlier demo did not write is the user's: never replaced
        found = torchstow.info(uri)
    except CheckpointNotFoundError:
        found = None
    if found is not None and found.user_metadata.get("note") != _NOTE:
        raise CheckpointExistsError(
            f"{uri} holds a checkpoint that is not the demo's; the demo writes <DIR>/step-2: "
            "pass another --path"
        )
    model, optim = _model(seed=0)
    for step in range(2):
        _train_step(model, optim, seed=step)
    state = _state(model, optim, step=2)
    nbytes = sum(t.nbytes for t in state["model"].values()) + sum(
        t.nbytes for s in state["optim"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    print(f"model: 6-layer transformer encoder, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"saving model + AdamW state ({nbytes / 2**20:.1f} MiB of tensors) to {uri}")
    start = time.perf_counter()
    torchstow.save(state, uri, metadata={"step": 2, "note": _NOTE}, overwrite=True)
    save_s = time.perf_counter() - start

    fresh_model, fresh_optim = _model(seed=1)
    _train_step(fresh_model, fresh_optim, seed=99)
    target = _state(fresh_model, fresh_optim, step=0)
    start = time.perf_counter()
    torchstow.load(target, uri)
    load_s = time.perf_counter() - start
    fresh_model.load_state_dict(target["model"])
    fresh_optim.load_state_dict(target["optim"])

    print("written:")
    names = sorted(os.listdir(uri))
    width = max(map(len, names))
    for name in names:
        print(f"  {name:<{width}} {os.path.getsize(os.path.join(uri, name)):>12,} bytes")
    info = torchstow.info(uri)
    print(f"manifest: {info.num_entries} entries, user metadata {json.dumps(info.user_metadata)}")
    print(f"save: {save_s:.3f} s ({nbytes / 2**30 / save_s:.2f} GiB/s, fsync on)")
    print(f"load: {load_s:.3f} s ({nbytes / 2**30 / load_s:.2f} GiB/s, checksums verified)")
    problems = _mismatches(_state(model, optim, 2), _state(fresh_model, fresh_optim, target["step"]))
    if problems:
        print(f"MISMATCH in {len(problems)} entries, e.g. {problems[:5]}", file=sys.stderr)
        return 1
    print("loaded state is bit-exact: OK")
    return 0
