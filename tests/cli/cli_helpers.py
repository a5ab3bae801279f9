"""Running the ``torchstow`` command, in this process through ``main`` or as a real
subprocess, and checking what it printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any
from unittest import mock

from moto_s3 import MOTO_CREDENTIALS
from torchstow.cli import main

__all__ = ["COMMAND", "S3_KEYS", "Result", "assert_one_line_error", "fails", "invoke", "json_doc", "run"]

S3_KEYS = MOTO_CREDENTIALS
COMMAND = os.path.join(os.path.dirname(sys.executable), "torchstow")
COLUMNS = {"COLUMNS": "200"}  # wide enough that no line of the tests' checkpoints is cut


@dataclass
class Result:
    """What one run of the command did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def invoke(*args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> Result:
    """Run ``torchstow ARGS...`` in this process through ``torchstow.cli.main``, capturing its
    output; ``env`` adds to the environment and ``unset`` removes variables from it for the call.
    A usage error (argparse's ``SystemExit``) is its exit status, as the real command's would be."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, {**COLUMNS, **(env or {})}):
        for name in unset:
            os.environ.pop(name, None)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return Result(code, out.getvalue(), err.getvalue())


def run(
    *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = (), timeout: float = 120
) -> Result:
    """Run ``torchstow ARGS...`` as a real process, as a user would (the smoke tests, and what
    needs a process: signals, a terminal); ``env`` and ``unset`` as for :func:`invoke`."""
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **COLUMNS, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(result: Result, *needles: str) -> None:
    """The command failed with exit status 1 and one ``torchstow: error:`` line, no traceback."""
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchstow: error: "), result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def fails(*args: str) -> str:
    """Runs ``torchstow ARGS...`` in this process expecting a one-line error; returns it."""
    result = invoke(*args)
    assert_one_line_error(result)
    return result.err


def json_doc(*args: str) -> Any:
    """Runs ``torchstow ARGS... --json`` in this process expecting success; returns the document."""
    result = invoke(*args, "--json")
    assert result.code == 0, result
    return result.json()
