"""Under an address-space limit, a 20 GB claim in a tiny file fails fast with the documented
error instead of allocating (which would take a machine down without the limit)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from tamper import save_original, tamper

CHILD = textwrap.dedent(
    """
    import resource, sys
    import torchstow
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + (1 << 30)  # 1 GiB above what the process maps now, far below 20 GB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    how = sys.argv[2]
    try:
        if how == "read":
            torchstow.read(sys.argv[1])
        else:
            import torch
            torchstow.load({"w": torch.zeros(4, 3), "opt": {"step": 0, "betas": (0.0, 0.0),
                            "m": [torch.zeros(2, dtype=torch.int64)]}}, sys.argv[1])
    except torchstow.CorruptCheckpointError as exc:
        print("REFUSED", exc)
    except BaseException as exc:
        print("OTHER", type(exc).__name__, exc)
    else:
        print("LOADED")
    """
)
CLAIM = 20 * 10**9


def run_limited(path: str, how: str) -> str:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to size the address-space limit")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, path, how], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_20_gb_object_claim_in_a_tiny_file_fails_fast(tmp_path: Any) -> None:
    path = save_original(str(tmp_path / "ckpt"))

    def claim(doc: dict[str, Any]) -> None:
        block = doc["checksum"]["block_size"]
        doc["entries"]["opt.betas"].update(length=CLAIM, crc32c=[0] * -(-CLAIM // block))

    tamper(path, claim)
    assert os.path.getsize(os.path.join(path, "manifest.json")) < 64 << 20
    out = run_limited(path, "load")
    assert out.startswith("REFUSED"), out
    assert "opt.betas" in out and "truncated or the manifest is wrong" in out


@pytest.mark.slow
def test_a_20_gb_tensor_claim_in_a_tiny_file_fails_fast(tmp_path: Any) -> None:
    path = save_original(str(tmp_path / "ckpt"))
    numel = CLAIM // 4

    def claim(doc: dict[str, Any]) -> None:
        block = doc["checksum"]["block_size"]
        doc["entries"]["w"].update(shape=[numel], length=CLAIM, crc32c=[0] * -(-CLAIM // block))

    tamper(path, claim)
    out = run_limited(path, "read")
    assert out.startswith("REFUSED"), out
    assert "'w'" in out
