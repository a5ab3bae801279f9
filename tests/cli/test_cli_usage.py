"""The command as a new user meets it: usage errors, exit statuses, wording, URI typos, option values."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.cli import main

from cli_helpers import fails, invoke, json_doc


def _usage_error(*args: str) -> str:
    """Runs the command expecting a usage error (exit 2); returns what it printed on stderr."""
    result = invoke(*args)
    assert result.code == 2, result
    return result.err


@pytest.fixture
def run(tmp_path: Path) -> Path:
    for step in (1, 2):
        torchstow.save({"w": torch.full((4,), float(step))}, str(tmp_path / "run" / f"step-{step}"))
    return tmp_path / "run"


def test_version() -> None:
    version = invoke("--version")
    assert (version.code, version.out.strip()) == (0, f"torchstow {torchstow.__version__}")


def test_options_may_follow_positionals_and_usage_errors_show_the_verb(run: Path) -> None:
    ckpt = str(run / "step-1")
    doc = json_doc("inspect", ckpt, "--json", "w*")  # --json between URI and PATTERN
    assert [k["key"] for k in doc["keys"]] == ["w"]
    # a pattern matching no key: exit 1 with --json too (before: exit 0 and "keys": [])
    for json_flag in ((), ("--json",)):
        assert "no key of" in fails("inspect", ckpt, "nomatch*", *json_flag)
    err = _usage_error("inspect", ckpt, "w*", "extra")
    assert err.startswith("usage: torchstow inspect ") and "unrecognized arguments: extra" in err
    err = _usage_error("prune", str(run), "--keep-last", "-1")
    assert err.startswith("usage: torchstow prune ") and "--keep-last: '-1' is not a non-negative" in err
    assert "--keep-every: '0' is not a positive" in _usage_error(
        "prune", str(run), "--keep-last", "1", "--keep-every", "0"
    )
    # an option without the one it goes with (before: exit 1, as if the command had failed)
    err = _usage_error("ls", str(run), "--fast", str(run / "{node}"))
    assert err.startswith("usage: torchstow ls ") and "--fast goes with --tiers" in err


def test_ls_of_a_checkpoint_shows_it_and_prune_of_nothing_fails(run: Path, tmp_path: Path) -> None:
    ckpt = str(run / "step-2")
    captured = invoke("ls", ckpt)
    assert captured.code == 0
    assert captured.out.splitlines()[-1].split()[-1] == ckpt
    assert f"{ckpt} is a checkpoint; 'torchstow info {ckpt}'" in captured.err
    ((entry),) = json_doc("ls", ckpt)["checkpoints"]
    assert (entry["uri"], entry["status"], entry["step"]) == (ckpt, "committed", 2)
    assert json_doc("du", ckpt)["total_bytes"] == torchstow.info(ckpt).nbytes

    assert "nothing under" in fails("prune", str(tmp_path / "nowhere"), "--keep-last", "1")
    assert "is a checkpoint, not a prefix" in fails("prune", ckpt, "--keep-last", "1")
    assert os.path.isdir(ckpt)


def test_a_file_where_a_checkpoint_goes_and_nothing_at_all_are_clear_errors(
    run: Path, tmp_path: Path
) -> None:
    # before: a raw NotADirectoryError / "[Errno 17] File exists", gc of a typo exited 0,
    # and info '' said "nothing at " with no name
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for verb in ("info", "verify", "inspect"):
        assert "no checkpoint at /dev/null: it is a file" in fails(verb, "/dev/null")
    with pytest.raises(torchstow.CheckpointNotFoundError, match="it is a file"):
        torchstow.info(str(notes))
    for dst in (notes, notes / "sub"):
        err = fails("cp", str(run / "step-1"), str(dst), "--overwrite")
        assert f"cannot copy to {dst}: it is a file" in err and "nothing was copied" in err
    assert notes.read_text() == "mine"
    assert "nothing under" in fails("gc", str(tmp_path / "nowhere"))
    for args in (("info", ""), ("cp", "", str(tmp_path / "x")), ("verify", str(run), "")):
        assert "argument is empty" in _usage_error(*args)


def test_json_output_is_strict_json(run: Path, tmp_path: Path) -> None:
    # before: a torch.save file holding inf printed "value": Infinity, and gc --older-than inf
    # printed "older_than": Infinity: no JSON that jq or a strict parser reads
    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))

    torch.save({"lr": float("inf"), "loss": float("nan"), "step": 3}, tmp_path / "state.pt")
    doc = strict(invoke("inspect", str(tmp_path / "state.pt"), "--json").out)
    assert {k["key"]: k["value"] for k in doc["keys"]} == {"lr": "inf", "loss": "nan", "step": 3}
    assert "--older-than: 'inf' is not a finite" in _usage_error("gc", str(run), "--older-than", "inf")
    assert strict(invoke("gc", str(run), "--older-than", "-0", "--json").out)["older_than"] == 0


def test_output_into_a_closed_pipe_ends_quietly(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchstow ls | head -1: before, "torchstow: error: [Errno 32] Broken pipe" and exit 1
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", buffering=1) as closed, contextlib.redirect_stdout(closed):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["ls", str(run)]) == 141
    assert err.getvalue() == ""


def test_storage_option_values_are_checked(run: Path) -> None:
    ckpt = str(run / "step-1")
    err = fails("info", ckpt, "-o", "thread_count=abc")
    assert "thread_count" in err and "must be int or None, got 'abc'" in err
    assert "thread_count must be at least 1, got 0" in fails("info", ckpt, "-o", "thread_count=0")
    assert "verify_checksums" in fails("verify", ckpt, "-o", "verify_checksums=yes")
    with pytest.raises(TypeError, match="thread_count"):
        torchstow.read(ckpt, storage_options={"thread_count": 2.5})


def test_uri_typos_never_become_local_paths(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = str(run / "step-1")
    err = fails("cp", ckpt, "s3:/bucket/x")
    assert "'s3:/bucket/x' is not a URI" in err and "write s3://bucket/x" in err
    fails("cp", ckpt, "s3:bucket/x")
    with pytest.raises(torchstow.UnknownBackendError, match="write shm://run/x"):
        torchstow.save({"w": torch.ones(1)}, "shm:/run/x")
    with pytest.raises(torchstow.UnknownBackendError, match="write 'S3://b/x' as 's3://b/x'"):
        torchstow.verify("S3://b/x")  # a call that does not write it for the backend says how
    assert not os.path.exists("s3:") and not os.path.exists("shm:")
    # file:/path (RFC 8089) and an upper-case scheme mean what they say
    assert json_doc("info", f"file:{ckpt}")["nbytes"] == 16
    assert json_doc("info", f"FILE://{ckpt}")["uri"] == f"file://{ckpt}"
    assert torch.equal(torchstow.read(f"File:{ckpt}")["w"], torch.ones(4))
    assert "absolute path" in fails("info", "file:relative/x")


def test_wrapper_scheme_without_a_uri_is_never_a_local_path(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``faulty+/abs/path`` once saved in plaintext to ``./faulty+/abs/path``, the wrapper never run."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "x"
    with pytest.raises(torchstow.UnknownBackendError, match=f"write faulty\\+file://{target}"):
        torchstow.save({"w": torch.ones(1)}, f"faulty+{target}")
    err = fails("cp", str(run / "step-1"), f"faulty+{target}")
    assert f"write faulty+file://{target}" in err and f"./faulty+{target} for a local path" in err
    assert f"write faulty+file://{tmp_path}/rel" in fails("info", "faulty+rel")
    assert f"write faulty+file://{target}," in fails("info", f"faulty+file:{target}")
    assert not os.path.exists("faulty+") and not target.exists()
    # the intended URI works, and a local name with a + that names no scheme is a path
    torchstow.save({"w": torch.ones(1)}, f"faulty+file://{target}")
    assert json_doc("info", f"faulty+file://{target}")["nbytes"] == 4
    torchstow.save({"w": torch.ones(1)}, "run+1/x")
    assert os.path.isdir("run+1/x")


def test_dcp_info_ls_and_du_agree_on_the_size(tmp_path: Path) -> None:
    stock = tmp_path / "run" / "step-3"
    dcp.save(
        {"w": torch.arange(6.0), "note": "dcp"}, storage_writer=dcp.FileSystemWriter(str(stock)), no_dist=True
    )
    info = json_doc("info", str(stock))
    ((listed),) = json_doc("ls", str(tmp_path / "run"))["checkpoints"]
    du = json_doc("du", str(tmp_path / "run"))
    assert info["format"] == listed["format"] == "dcp"
    assert info["nbytes"] == listed["nbytes"] == du["total_bytes"] == torchstow.info(str(stock)).nbytes
