"""Start real torchrun agents (c10d rendezvous on 127.0.0.1) for the tiered tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Job:
    """``nnodes`` torchrun agents started together (see :func:`start_job`)."""

    def __init__(self, out: Path, agents: list[subprocess.Popen], logs: list, timeout: float) -> None:
        self.out, self.agents, self.logs, self.timeout = out, agents, logs, timeout

    def wait(self) -> tuple[list[int], dict[int, dict]]:
        """The agents' exit codes and each rank's record (ranks that died write none)."""
        try:
            codes = [agent.wait(self.timeout) for agent in self.agents]
        finally:
            for agent in self.agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
            for log in self.logs:
                log.close()
        records = {}
        for path in self.out.glob("rank-*.json"):
            record = json.loads(path.read_text())
            records[record["rank"]] = record
        return codes, records


def start_job(
    tmp: Path,
    name: str,
    mode: str,
    *args: object,
    nnodes: int = 2,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> Job:
    """Start ``nnodes`` torchrun agents of ``nproc`` workers each (``worker.py MODE ...``);
    several jobs run side by side."""
    out = tmp / name
    out.mkdir()
    port = free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "TORCHELASTIC_ERROR_FILE": "",
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--max-restarts=0", "--monitor-interval=0.2",
        str(WORKER), mode, str(out), *map(str, args),
    ]  # fmt: skip
    logs = [open(out / f"agent-{k}.log", "w") for k in range(nnodes)]  # noqa: SIM115 (closed by wait)
    agents = [
        subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=tmp) for log in logs
    ]
    return Job(out, agents, logs, timeout)


def run_job(*args: Any, **kwargs: Any) -> tuple[list[int], dict[int, dict]]:
    """:func:`start_job` and wait for it: the agents' exit codes and each rank's record."""
    return start_job(*args, **kwargs).wait()


def logs_of(tmp: Path, name: str) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted((tmp / name).glob("agent-*.log")))
