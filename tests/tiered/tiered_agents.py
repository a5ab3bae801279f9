"""Start real torchrun agents (c10d rendezvous on 127.0.0.1) for the tiered tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(
    tmp: Path,
    name: str,
    mode: str,
    *args: object,
    nnodes: int = 2,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> tuple[list[int], dict[int, dict]]:
    """Run ``nnodes`` torchrun agents of ``nproc`` workers each; their exit codes and each
    rank's record (ranks that died write none)."""
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
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out / f"agent-{k}.log", "w")) for k in range(nnodes)]
        agents = [
            subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
            for log in logs
        ]
        try:
            codes = [agent.wait(timeout) for agent in agents]
        finally:
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
    records = {}
    for path in out.glob("rank-*.json"):
        record = json.loads(path.read_text())
        records[record["rank"]] = record
    return codes, records


def logs_of(tmp: Path, name: str) -> str:
    return "\n".join(p.read_text()[-4000:] for p in sorted((tmp / name).glob("agent-*.log")))
