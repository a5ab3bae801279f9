"""compression="zstd" against DCP's ZStandard storage extension, on the same state.

Workload: the demo transformer (``torchstow demo``: 6 encoder layers, d_model 512) and its
AdamW state after a few steps, in float32 and again as bfloat16 copies. Each contender saves
it to local files and loads it back into a preallocated state dict:

- torchstow ``save(..., compression="zstd")`` / ``load``, with its default threads and with
  one (``storage_options={"thread_count": 1}``: one writer and one reader thread, as DCP's
  reader has);
- DCP ``FileSystemWriter(path, _extensions=[ZStandard()])`` / ``FileSystemReader(path)``,
  with its default single writer thread and with as many threads as torchstow uses;
- both uncompressed, for reference.

Reported: stored bytes / raw tensor bytes for each (fp32 and bf16 parts apart, and all),
save and load seconds, and the ratios DCP-with-ZStandard / torchstow (best DCP variant):
targets ratio <= DCP's (as stored/raw), save and load >= 3x. Every load is checked bit for bit.
Then the codecs alone, without files: the CPU seconds, on one thread, of compressing and
decompressing every tensor's bytes with torchstow's codec and with DCP's ``ZStandard``
stream transform (what its writer and reader run per item), the best of the rounds.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import zstandard

import torchstow
from torchstow.cli.demo import _model, _train_step
from torchstow.core.layout.location import default_thread_count

from common import Report, Result, assert_equal, fresh_dir, tensor_bytes, zeros_like_state_dict

MiB = 1 << 20


def demo_state(steps: int = 3) -> dict[str, Any]:
    """The demo transformer and its AdamW state after ``steps`` steps, in float32 and in bfloat16."""
    model, optim = _model(0)
    for step in range(steps):
        _train_step(model, optim, step + 1)
    fp32 = {"model": model.state_dict(), "optim": optim.state_dict()}

    def bf16(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(torch.bfloat16) if value.is_floating_point() and value.dim() else value.clone()
        if isinstance(value, dict):
            return {k: bf16(v) for k, v in value.items()}
        return value

    return {"fp32": fp32, "bf16": bf16(fp32)}


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def _stored_bytes(path: str, prefix: str = "", suffix: str = "") -> int:
    """Bytes of the data files in ``path``."""
    return sum(
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.startswith(prefix) and name.endswith(suffix)
    )


def _dcp(path: str, threads: int, compress: bool) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard

    def save(state: Any) -> None:
        extensions = [ZStandard()] if compress else None
        writer = dcp.FileSystemWriter(path, thread_count=threads, _extensions=extensions)
        dcp.save(state, storage_writer=writer, no_dist=True)

    def load(target: Any) -> None:
        dcp.load(target, storage_reader=dcp.FileSystemReader(path), no_dist=True)

    return save, load


def _torchstow(
    path: str, compression: str | None, threads: int | None = None
) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    options = None if threads is None else {"thread_count": threads}

    def save(state: Any) -> None:
        torchstow.save(state, path, overwrite=True, compression=compression, storage_options=options)

    def load(target: Any) -> None:
        torchstow.load(target, path, storage_options=options)

    return save, load


def _ratios(root: str, state: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Stored / raw bytes of the fp32 part, the bf16 part and both, for each compressor."""
    out: dict[str, dict[str, float]] = {}
    for part in ("fp32", "bf16", "all"):
        sub = state if part == "all" else {part: state[part]}
        raw = tensor_bytes(sub)
        ours = os.path.join(root, f"ratio-torchstow-{part}")
        theirs = os.path.join(root, f"ratio-dcp-{part}")
        fresh_dir(ours)
        fresh_dir(theirs)
        _torchstow(ours, "zstd")[0](sub)
        _dcp(theirs, 1, True)[0](sub)
        out.setdefault("torchstow zstd", {})[part] = _stored_bytes(ours, "data-") / raw
        out.setdefault("DCP ZStandard", {})[part] = _stored_bytes(theirs, suffix=".distcp") / raw
    return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.contiguous()] if value.numel() else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (a view)."""
    return t.reshape(-1).view(torch.uint8)


def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, flat."""
    return memoryview(_flat(t).numpy())


def _codec_seconds(tensors: list[torch.Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """Best CPU seconds (one thread) to compress, then decompress, every tensor's bytes with
    torchstow's codec and with DCP's ZStandard stream transform, after an untimed round.
    Both decompress into preallocated tensors (as a load into a preallocated state dict
    does); each round is checked bit for bit after it is timed."""
    from torch.distributed.checkpoint._extension import ZStandard

    from torchstow.core.layout.compression import compress, decompress_into

    outs = [torch.empty_like(t) for t in tensors]

    def ours_compress() -> list[Any]:
        return [compress(_raw(t), t.dtype) for t in tensors]

    def ours_decompress(stored: list[Any]) -> None:
        for t, out, item in zip(tensors, outs, stored, strict=True):
            if item is None:
                _flat(out).copy_(_flat(t))
                continue
            data, codec = item
            raw = memoryview(data) if isinstance(data, bytes) else memoryview(data.numpy())
            decompress_into(raw, codec, t.dtype, out)

    def dcp_compress() -> list[bytes]:
        frames = []
        for t in tensors:
            sink = io.BytesIO()
            stream = ZStandard().transform_to(sink)
            stream.write(_raw(t))
            stream.flush(zstandard.FLUSH_FRAME)
            frames.append(sink.getvalue())
        return frames

    def dcp_decompress(frames: list[bytes]) -> None:
        for out, frame in zip(outs, frames, strict=True):
            view, got = _raw(out), 0
            stream = ZStandard().transform_from(io.BytesIO(frame))
            while got < len(view):
                got += stream.readinto(view[got:]) or len(view)  # a stream that ends short fails below

    best: dict[str, dict[str, float]] = {
        name: {"compress": float("inf"), "decompress": float("inf")} for name in ("torchstow", "DCP")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(repeats + 1):  # round 0 warms up, untimed
            for name, squeeze, unsqueeze in (
                ("torchstow", ours_compress, ours_decompress),
                ("DCP", dcp_compress, dcp_decompress),
            ):
                for out in outs:
                    out.zero_()
                start = time.process_time()
                stored = squeeze()
                middle = time.process_time()
                unsqueeze(stored)  # type: ignore[arg-type]
                end = time.process_time()
                # Freed before the next compressor runs, so that each finds the memory the
                # last one left (else one pays page faults for fresh memory, at random).
                del stored
                for t, out in zip(tensors, outs, strict=True):
                    assert torch.equal(_flat(out), _flat(t)), name
                if round_:
                    best[name]["compress"] = min(best[name]["compress"], middle - start)
                    best[name]["decompress"] = min(best[name]["decompress"], end - middle)
    finally:
        torch.set_num_threads(threads)
    return best


def main(root: str, repeats: int, report: Report) -> None:
    """Stored/raw ratios, then save and load times of each contender; the ratios vs DCP's ZStandard."""
    state = demo_state()
    nbytes = tensor_bytes(state)
    threads = default_thread_count()
    print(
        f"compression: demo transformer + AdamW, fp32 and bf16 ({nbytes / MiB:.0f} MiB of tensors), "
        f"loadavg {_loadavg()}",
        flush=True,
    )
    ratios = _ratios(root, state)
    for name, parts in ratios.items():
        shown = ", ".join(f"{part} {value:.3f}" for part, value in parts.items())
        print(f"  stored/raw {name:<16} {shown}", flush=True)
    contenders = {
        "torchstow zstd": _torchstow(os.path.join(root, "c-torchstow"), "zstd"),
        "torchstow zstd 1 thr": _torchstow(os.path.join(root, "c-torchstow-1"), "zstd", 1),
        "DCP ZStandard": _dcp(os.path.join(root, "c-dcp-1"), 1, True),
        f"DCP ZStandard {threads} thr": _dcp(os.path.join(root, "c-dcp-n"), threads, True),
        "torchstow raw": _torchstow(os.path.join(root, "c-torchstow-raw"), None),
        "DCP raw": _dcp(os.path.join(root, "c-dcp-raw"), 1, False),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"save": [], "load": []} for name in contenders}
    targets = {name: zeros_like_state_dict(state) for name in contenders}
    for round_ in range(repeats + 1):  # round 0 warms up, untimed
        for name, (save, load) in contenders.items():
            start = time.perf_counter()
            save(state)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            load(targets[name])
            loaded = time.perf_counter() - start
            if round_:
                times[name]["save"].append(saved)
                times[name]["load"].append(loaded)
            else:
                assert_equal(targets[name], state)
    results = {
        (name, op): report.add(Result("demo+AdamW", op, name, seconds, nbytes))
        for name, ops in times.items()
        for op, seconds in ops.items()
    }
    dcp_names = [name for name in contenders if name.startswith("DCP ZStandard")]
    best_ratios = {}
    for op in ("save", "load"):
        theirs = [results[name, op] for name in dcp_names]
        report.ratio(f"zstd {op} speed vs DCP ZStandard", results["torchstow zstd", op], theirs, 3.0)
        # On a shared machine the best of the rounds says more than the median: both kept.
        best_ratios[op] = min(r.best for r in theirs) / results["torchstow zstd", op].best
        print(f"  (by best times: {op} {best_ratios[op]:.2f}x)", flush=True)
        # Thread for thread: DCP's reader has one thread, torchstow's as many as cores (here 2).
        report.ratio(
            f"zstd {op}, 1 thread each, vs DCP ZStandard",
            results["torchstow zstd 1 thr", op],
            [results["DCP ZStandard", op]],
            3.0,
        )
    ours_all, theirs_all = ratios["torchstow zstd"]["all"], ratios["DCP ZStandard"]["all"]
    report.ratios["zstd stored/raw, DCP's over torchstow's"] = theirs_all / ours_all
    mark = "meets" if ours_all <= theirs_all else "BELOW"
    print(
        f"  stored/raw torchstow {ours_all:.3f} vs DCP {theirs_all:.3f} (target <= DCP's: {mark})", flush=True
    )
    codecs = _codec_seconds(_tensors(state), max(repeats, 1))
    codec_ratios = {}
    for op in ("compress", "decompress"):
        ours_s, theirs_s = codecs["torchstow"][op], codecs["DCP"][op]
        codec_ratios[op] = theirs_s / ours_s
        print(
            f"  codec alone, one thread, {op}: torchstow {ours_s:.3f} s ({nbytes / MiB / ours_s:.0f} MiB/s), "
            f"DCP ZStandard {theirs_s:.3f} s: {codec_ratios[op]:.2f}x (target >= 3x)",
            flush=True,
        )
        report.ratios[f"zstd {op} CPU (codec alone) vs DCP ZStandard"] = codec_ratios[op]
    report.details["compression"] = {
        "stored_over_raw": ratios,
        "speed_ratios_by_best_time": best_ratios,
        "codec_cpu_seconds": codecs,
        "codec_speed_ratios": codec_ratios,
        "loadavg": _loadavg(),
    }
