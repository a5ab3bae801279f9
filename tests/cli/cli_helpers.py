"""Running the real ``torchstow`` command in a subprocess, and checking what it printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["COMMAND", "S3_KEYS", "Result", "assert_one_line_error", "run"]

S3_KEYS = {"key": "testing", "secret": "testing"}
COMMAND = os.path.join(os.path.dirname(sys.executable), "torchstow")


@dataclass
class Result:
    """What one run of the command did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(
    *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = (), timeout: float = 120
) -> Result:
    """Run ``torchstow ARGS...`` as a user would, capturing its output; ``env`` adds to the
    environment and ``unset`` removes variables from it."""
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, "COLUMNS": "200", **(env or {})},
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
