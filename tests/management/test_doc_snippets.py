"""The code the docs show, run as written: a block marked ``<!-- snippet: NAME -->`` in
README.md or docs/*.md is exec'd with the names its prose leaves to the reader (only the
example location ``/ckpt/run1`` is moved to a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import torchstow

REPO = Path(__file__).resolve().parents[2]


def snippet(doc: str, name: str) -> str:
    """The fenced Python block right after ``<!-- snippet: name -->`` in ``doc`` (a path in the repo)."""
    text = (REPO / doc).read_text()
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert found is not None, f"no snippet {name!r} in {doc}"
    return found.group(1)


def run_snippet(doc: str, name: str, root: Path, names: dict[str, Any]) -> dict[str, Any]:
    """Run the snippet with ``/ckpt/run1`` moved under ``root``; its namespace afterwards."""
    code = snippet(doc, name).replace("/ckpt/run1", str(root))
    exec(compile(code, doc, "exec"), names)  # the documented code, run as written
    return names


def _train_step(state: dict[str, Any]) -> float:
    state["w"] += 1  # one step of training: every step counts once
    return float(state["w"].sum())


def _run_loop(root: Path, steps: int) -> dict[str, Any]:
    """The manager loop of docs/cli.md in a fresh process's state, up to ``steps``."""
    code = snippet("docs/cli.md", "manager-loop").replace('"/ckpt/run1"', repr(str(root)))
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


def test_the_readme_example_saves_finds_the_newest_and_loads_it(tmp_path: Path) -> None:
    root = tmp_path / "run1"
    model = torch.nn.Linear(4, 2)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ns = run_snippet(
        "README.md", "readme-save-load", root, {"model": model, "optim": optim, "step": 7, "epoch": 2}
    )
    assert ns["latest"] == f"{root}/step-7"
    assert torchstow.info(ns["latest"]).user_metadata == {"epoch": 2}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert ns["state"]["step"] == 7


def test_the_quickstart_examples_run_in_order(tmp_path: Path, capsys: Any) -> None:
    root = tmp_path / "run1"
    ns = run_snippet("docs/quickstart.md", "quickstart-save", root, {})
    saved = {k: v.clone() for k, v in ns["model"].state_dict().items()}
    with torch.no_grad():
        ns["model"].weight.zero_()
    run_snippet("docs/quickstart.md", "quickstart-load", root, ns)
    assert capsys.readouterr().out.strip() == "100"  # the step the save stored
    assert torch.equal(ns["model"].weight, saved["weight"])  # the weights it stored, not the zeros
    run_snippet("docs/quickstart.md", "quickstart-look", root, ns)
    assert ns["info"].user_metadata == {"epoch": 3}
    assert torchstow.list_checkpoints(root) == []  # the last line deleted it
    ns["path"] = str(root / "step-200")
    run_snippet("docs/quickstart.md", "quickstart-options", root, ns)
    assert torchstow.info(ns["path"]).num_entries > 0
