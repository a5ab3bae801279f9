"""The code the docs show, run as written: a block marked ``<!-- snippet: NAME -->`` in
docs/*.md is exec'd with the names its prose leaves to the reader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import torchstow

DOCS = Path(__file__).resolve().parents[2] / "docs"


def snippet(doc: str, name: str) -> str:
    """The fenced Python block right after ``<!-- snippet: name -->`` in ``docs/<doc>``."""
    text = (DOCS / doc).read_text()
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found is not None, f"no snippet {name!r} in docs/{doc}"
    return found.group(1)


def _train_step(state: dict[str, Any]) -> float:
    state["w"] += 1  # one step of training: every step counts once
    return float(state["w"].sum())


def _run_loop(root: Path, steps: int) -> dict[str, Any]:
    """The manager loop of docs/cli.md in a fresh process's state, up to ``steps``."""
    code = snippet("cli.md", "manager-loop").replace('"/ckpt/run1"', repr(str(root)))
    state = {"w": torch.zeros(4)}
    exec(  # the documented code, run as written
        compile(code, "docs/cli.md", "exec"),
        {"torchstow": torchstow, "state": state, "steps": steps, "train_step": _train_step},
    )
    return state


def test_the_manager_loop_stops_resumes_and_trains_each_step_once(tmp_path: Path) -> None:
    root = tmp_path / "run1"
    _run_loop(root, 2500)  # stops after step 2499; saved 0, 1000, 2000
    assert torchstow.CheckpointManager(root).steps() == [0, 1000, 2000]
    resumed = _run_loop(root, 4500)  # restores step 2000 and goes on from 2001
    assert torch.equal(resumed["w"], torch.full((4,), 4500.0))  # as a run that never stopped
    assert torchstow.CheckpointManager(root).steps() == [0, 2000, 3000, 4000]  # keep_last=3, keep_every
    back = {"w": torch.zeros(4)}
    assert torchstow.CheckpointManager(root).restore(back) == 4000
    assert torch.equal(back["w"], torch.full((4,), 4001.0))
