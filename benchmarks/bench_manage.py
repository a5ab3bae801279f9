"""Managing checkpoints: verify, copy and convert, each beside the nearest existing tool, with peak memory.

- verify: ``torchstow.verify`` vs reading the whole checkpoint (``torchstow.read``,
  which checks the checksums as it loads) and vs ``dcp.load`` of the same state
  saved by DCP (which has no checksums) into a preallocated state dict.
- copy: ``torchstow.copy`` (streamed, every checksum checked, synced to disk as every
  filesystem save is; and with ``fsync=False``) vs ``shutil.copytree`` (no checks, no sync).
- convert to safetensors: ``torchstow.convert(to="safetensors")`` (streamed, tensor by
  tensor) vs ``safetensors.torch.save_file`` of the state ``torchstow.read`` loaded.
- convert to torch.save: ``torchstow.convert(to="torch")`` vs DCP's own
  ``dcp_to_torch_save`` of the DCP copy.

Each contender runs in a fresh process (so the peak resident memory it reports,
above what the process held after its imports, is its own); contenders
alternate in rounds and the report keeps each one's median time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from common import GiB, Report, Result, fresh_dir, large_state_dict

SIZE_ENV = "TORCHSTOW_BENCH_MANAGE_BYTES"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the process's resident-memory high-water mark (Linux); returns the resident bytes now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _flat(sd: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _ops(root: str) -> dict[str, Callable[[], Any]]:
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import torchstow

    src, dcp_src, out = os.path.join(root, "src"), os.path.join(root, "dcp"), os.path.join(root, "out")

    def verify() -> None:
        assert torchstow.verify(src).ok

    def dcp_load() -> None:
        entries = torchstow.storage_reader(src).read_metadata().state_dict_metadata
        target = {k: torch.zeros(e.size, dtype=e.properties.dtype) for k, e in entries.items()}
        dcp.load(target, storage_reader=dcp.FileSystemReader(dcp_src), no_dist=True)

    def save_file_of_read() -> None:
        os.makedirs(out, exist_ok=True)
        save_file(
            _flat(torchstow.read(src)), os.path.join(out, "model.safetensors"), metadata={"format": "pt"}
        )

    return {
        "verify/torchstow.verify": verify,
        "verify/torchstow.read": lambda: torchstow.read(src),
        "verify/dcp.load": dcp_load,
        "copy/torchstow.copy": lambda: torchstow.copy(src, out),
        "copy/torchstow.copy fsync=False": lambda: torchstow.copy(
            src, out, dst_storage_options={"fsync": False}
        ),
        "copy/shutil.copytree": lambda: shutil.copytree(src, out),
        "safetensors/torchstow.convert": lambda: torchstow.convert(src, out, to="safetensors"),
        "safetensors/save_file(read())": save_file_of_read,
        "torch/torchstow.convert": lambda: torchstow.convert(src, os.path.join(root, "out.pt"), to="torch"),
        "torch/dcp_to_torch_save": lambda: dcp_to_torch_save(dcp_src, os.path.join(root, "out.pt")),
    }


def child(name: str, root: str) -> None:
    """Run one contender once in this fresh process; print its time and peak memory as JSON."""
    import torch  # noqa: F401  (imported before the baseline, as every contender needs it)

    import torchstow  # noqa: F401

    ops = _ops(root)
    base = _reset_peak_rss()
    start = time.perf_counter()
    ops[name]()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": max(0, _status_kib("VmHWM") * 1024 - base)}))


def _run_child(name: str, root: str) -> dict[str, Any]:
    for path in ("out", "out.pt"):
        fresh_dir(os.path.join(root, path))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", name, root],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(root: str, repeats: int, report: Report) -> None:
    """Prepare a checkpoint (torchstow and DCP copies), then time every contender."""
    import torch.distributed.checkpoint as dcp

    import torchstow

    nbytes = int(os.environ.get(SIZE_ENV, GiB))
    print(f"managing checkpoints: {nbytes / GiB:.2f} GiB of float32 in 64 tensors", flush=True)
    sd = large_state_dict(nbytes)
    torchstow.save(sd, os.path.join(root, "src"), overwrite=True)
    fresh_dir(os.path.join(root, "dcp"))
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(os.path.join(root, "dcp")), no_dist=True)
    del sd
    names = list(_ops(root))
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for _ in range(repeats):
        for name in names:
            got = _run_child(name, root)
            times[name].append(got["seconds"])
            peaks[name] = max(peaks[name], got["peak_rss"])
    results = {}
    workload = f"{nbytes / GiB:.2f}GiB"
    for name in names:
        op, contender = name.split("/", 1)
        results[name] = report.add(Result(workload, op, contender, times[name], nbytes, peak_rss=peaks[name]))
    for ours, theirs in (
        ("verify/torchstow.verify", ["verify/torchstow.read", "verify/dcp.load"]),
        ("copy/torchstow.copy fsync=False", ["copy/shutil.copytree"]),
        ("safetensors/torchstow.convert", ["safetensors/save_file(read())"]),
        ("torch/torchstow.convert", ["torch/dcp_to_torch_save"]),
    ):
        report.ratio(f"{ours} vs {' / '.join(theirs)}", results[ours], [results[t] for t in theirs], 1.0)
    for path in ("src", "dcp", "out", "out.pt"):
        fresh_dir(os.path.join(root, path))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="torchstow-bench-manage-") as tmp:
            report = Report("managing checkpoints")
            main(tmp, int(sys.argv[1]) if len(sys.argv) > 1 else 3, report)
