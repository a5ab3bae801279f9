"""Killing a child process at a known point of a save."""

from __future__ import annotations

import signal
import subprocess


def kill_once_writing(child: subprocess.Popen[str]) -> None:
    """Wait for ``child`` to print ``writing`` (its save is under way), then kill it
    with SIGKILL; the child is gone when this returns, whatever happened."""
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "writing\n", child.stderr.read() if child.stderr else line
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
