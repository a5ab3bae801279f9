"""The command as a new user meets it: usage errors, exit statuses, wording, URI typos, option values."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import torchstow
from torchstow.cli import main

from cli_helpers import Result, assert_one_line_error


def _usage_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs the command expecting a usage error (exit 2); returns what it printed on stderr."""
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    assert caught.value.code == 2
    return capsys.readouterr().err


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Runs the command expecting a one-line error (exit 1); returns the line."""
    code = main(list(args))
    captured = capsys.readouterr()
    assert_one_line_error(Result(code, captured.out, captured.err))
    return captured.err


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    for step in (1, 2):
        torchstow.save({"w": torch.full((4,), float(step))}, str(tmp_path / "run" / f"step-{step}"))
    return tmp_path / "run"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchstow {torchstow.__version__}"


def test_options_may_follow_positionals_and_usage_errors_show_the_verb(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(run / "step-1")
    doc = _json(capsys, "inspect", ckpt, "--json", "w*")  # --json between URI and PATTERN
    assert [k["key"] for k in doc["keys"]] == ["w"]
    err = _usage_error(capsys, "inspect", ckpt, "w*", "extra")
    assert err.startswith("usage: torchstow inspect ") and "unrecognized arguments: extra" in err
    err = _usage_error(capsys, "prune", str(run), "--keep-last", "-1")
    assert err.startswith("usage: torchstow prune ") and "--keep-last: '-1' is not a non-negative" in err
    assert "--keep-every: '0' is not a positive" in _usage_error(
        capsys, "prune", str(run), "--keep-last", "1", "--keep-every", "0"
    )


def test_ls_of_a_checkpoint_shows_it_and_prune_of_nothing_fails(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(run / "step-2")
    assert main(["ls", ckpt]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].split()[-1] == ckpt
    assert f"{ckpt} is a checkpoint; 'torchstow info {ckpt}'" in captured.err
    ((entry),) = _json(capsys, "ls", ckpt)["checkpoints"]
    assert (entry["uri"], entry["status"], entry["step"]) == (ckpt, "committed", 2)
    assert _json(capsys, "du", ckpt)["total_bytes"] == torchstow.info(ckpt).nbytes

    assert "nothing under" in _fails(capsys, "prune", str(tmp_path / "nowhere"), "--keep-last", "1")
    assert "is a checkpoint, not a prefix" in _fails(capsys, "prune", ckpt, "--keep-last", "1")
    assert os.path.isdir(ckpt)


def test_storage_option_values_are_checked(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(run / "step-1")
    err = _fails(capsys, "info", ckpt, "-o", "thread_count=abc")
    assert "thread_count" in err and "must be int or None, got 'abc'" in err
    assert "thread_count must be at least 1, got 0" in _fails(capsys, "info", ckpt, "-o", "thread_count=0")
    assert "verify_checksums" in _fails(capsys, "verify", ckpt, "-o", "verify_checksums=yes")
    with pytest.raises(TypeError, match="thread_count"):
        torchstow.read(ckpt, storage_options={"thread_count": 2.5})


def test_uri_typos_never_become_local_paths(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = str(run / "step-1")
    err = _fails(capsys, "cp", ckpt, "s3:/bucket/x")
    assert "'s3:/bucket/x' is not a URI" in err and "write s3://bucket/x" in err
    _fails(capsys, "cp", ckpt, "s3:bucket/x")
    with pytest.raises(torchstow.UnknownBackendError, match="write shm://run/x"):
        torchstow.save({"w": torch.ones(1)}, "shm:/run/x")
    with pytest.raises(torchstow.UnknownBackendError, match="write 'S3://b/x' as 's3://b/x'"):
        torchstow.verify("S3://b/x")  # a call that does not write it for the backend says how
    assert not os.path.exists("s3:") and not os.path.exists("shm:")
    # file:/path (RFC 8089) and an upper-case scheme mean what they say
    assert _json(capsys, "info", f"file:{ckpt}")["nbytes"] == 16
    assert _json(capsys, "info", f"FILE://{ckpt}")["uri"] == f"file://{ckpt}"
    assert torch.equal(torchstow.read(f"File:{ckpt}")["w"], torch.ones(4))
    assert "absolute path" in _fails(capsys, "info", "file:relative/x")


def test_dcp_info_ls_and_du_agree_on_the_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stock = tmp_path / "run" / "step-3"
    dcp.save(
        {"w": torch.arange(6.0), "note": "dcp"}, storage_writer=dcp.FileSystemWriter(str(stock)), no_dist=True
    )
    info = _json(capsys, "info", str(stock))
    ((listed),) = _json(capsys, "ls", str(tmp_path / "run"))["checkpoints"]
    du = _json(capsys, "du", str(tmp_path / "run"))
    assert info["format"] == listed["format"] == "dcp"
    assert info["nbytes"] == listed["nbytes"] == du["total_bytes"] == torchstow.info(str(stock)).nbytes
