"""The command on a terminal (a progress bar on stderr), the backends list, the console script."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.cli import main

from cli_helpers import COMMAND


def _run_on_terminal(*args: str) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal; returns (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the other side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [COMMAND, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, timeout=120
        )
    finally:
        os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, proc.stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_bar_shows_bytes_and_rate_on_a_terminal_only(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "step-1")
    torchstow.save({"w": torch.randn(4, 1024, 1024)}, ckpt)
    code, out, terminal = _run_on_terminal("verify", ckpt)
    assert code == 0 and out.startswith(f"OK       {ckpt} ")
    assert "verify" in terminal and "16.0/16.0 MiB" in terminal, terminal
    assert re.search(r"\d[\d.]* [kMG]?B/s", terminal), terminal  # the rate's unit follows the speed
    code, out, terminal = _run_on_terminal("verify", ckpt, "--no-progress")
    assert code == 0 and out.startswith("OK") and terminal == ""


def test_backends_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["backends", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    schemes = {b["scheme"]: b for b in doc["backends"]}
    assert {"file", "shm", "s3", "faulty"} <= schemes.keys()
    assert schemes["file"]["backend"] == "torchstow.backends.filesystem.FileSystemBackend"
    assert schemes["file"]["plugin"] == "filesystem"


def test_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "torchstow"]
    assert script.value == "torchstow.cli:main"
    assert os.access(COMMAND, os.X_OK)
