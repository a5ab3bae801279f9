"""A rank that ends by SystemExit (a SIGTERM handler's, as torchelastic's) right after
collectives on torchstow's private gloo groups exits with that status, not SIGABRT.

Without the groups destroyed at exit, a gloo worker thread could still hold the last
reference to a finished collective's tensors while the interpreter finalizes; dropping it
then aborted the process ("terminate called without an active exception") in about one
run of three. The race is repeated a few times, each in fresh processes with real gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_pool import free_port

RANKS = 2
RUNS = 8

_RANK = """
import os
from datetime import timedelta

import torch.distributed as dist

from torchstow.core.protocol.collective import ProcessGroupCollective
from torchstow.core.protocol.gloo_groups import private_gloo_group

dist.init_process_group("gloo")
rank = dist.get_rank()
coll = ProcessGroupCollective(private_gloo_group(range(dist.get_world_size()), timedelta(seconds=60)))
for _ in range(3):
    coll.broadcast(b"x" * 1000 if rank == 0 else None, "broadcast")
    coll.gather(b"y" * 100, "gather")
if rank == 0:
    raise SystemExit(143)  # what a SIGTERM handler raises; the world group is left as it is
dist.destroy_process_group()
"""


def _run(script: Path) -> list[tuple[int, str]]:
    port = free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    procs = []
    for rank in range(RANKS):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(RANKS),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        )
        command = [sys.executable, str(script)]
        piped = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        procs.append(subprocess.Popen(command, env=env, text=True, **piped))
    outcomes = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        outcomes.append((proc.returncode, out))
    return outcomes


@pytest.mark.slow
def test_systemexit_after_private_group_collectives_keeps_its_status(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    for run in range(RUNS):
        (code, out), *others = _run(script)
        assert code == 143, (run, code, out[-2000:])
        for other_code, other_out in others:
            assert other_code == 0, (run, other_code, other_out[-2000:])
