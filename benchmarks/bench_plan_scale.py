"""The coordinator at scale: global planning and the manifest for many ranks x items.

One process is fed ``ranks`` simulated local save plans of ``items`` items
each, as a coordinator would receive them: 90% shards of tensors sharded by
rows over every rank, 10% replicated tensors every rank holds (deduplicated
and balanced). Timed, for torchstow: the global plan (dedup, balancing,
metadata, validation of every tensor's chunks), the writer's global step,
the commit's chunk table made from every rank's write results (each rank
sends its layout writer's results as columns, built here untimed as the
rank builds them, pickled as the gather sends them), encoding the manifest
with every item's location and checksum, and decoding it again. Unpickling
the gathered results is timed and reported apart ("unpickle results"), as
the plans' unpickling is not timed either. For DCP, on equivalent plans:
``DefaultSavePlanner.create_global_plan`` (dedup, metadata, validation) and
pickling and unpickling its metadata with every item's location (its write
results given, as torchstow's are). Each size runs in a fresh process (so memory is its
own): the peak memory above what the input plans hold is reported. Times are
the CPU seconds of each step (wall seconds are recorded too): the steps are
single-threaded Python, and CPU time stays meaningful on a shared machine.
The cyclic garbage collector is off during each step, for both (torchstow's
save protocol turns it off; with it on, its passes over millions of plan
objects make any planner look super-linear).

DCP is not run past ``--dcp-max-ranks`` ranks (its planning takes minutes
there, and its memory grows with it): its times at such a size are
extrapolated linearly in the ranks from the same number of items at the
largest size it ran, halving the ranks until within the cap (measured:
its time grows about linearly with ranks from 64 to 512, so the figure is
if anything low). Extrapolated figures are printed, stored and plotted
apart, with the size they come from, never mixed with measured ones.
``--base-only`` measures only the base size (and DCP's source size for it).

python benchmarks/bench_plan_scale.py [--ranks 1024] [--items 2000] [--dcp-max-ranks 512]
    [--base-only] [--plot docs/plan_scale.png]
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import pickle
import resource
import sys
import tempfile
import time
import uuid
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Report, Result

REPLICATED = 0.1
ROWS = 8  # rows of each rank's shard
COLS = 16


def _rss_kib() -> tuple[int, int]:
    """(current, peak) resident memory of this process, in KiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _memory_base() -> int:
    """Where a contender's peak memory is counted from, alike for each: the resident KiB
    once its input plans are built, after a garbage collection, with the peak reset to it."""
    gc.collect()
    base, _ = _rss_kib()
    _reset_peak()
    return base


def _peak_mib(base: int) -> float:
    """The peak resident MiB above ``base`` (from :func:`_memory_base`) so far."""
    _, peak = _rss_kib()
    return (peak - base) / 1024


def _split(items: int) -> tuple[int, int]:
    replicated = int(items * REPLICATED)
    return items - replicated, replicated


def torchstow_plans(ranks: int, items: int) -> list[Any]:
    """Local plans as a coordinator receives them (each rank's items share their
    write data, as torchstow's planner makes them)."""
    from torchstow.core.planning import SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torchstow.format.manifest import ChunkStorageMetadata, MetadataIndex, TensorProperties

    sharded, replicated = _split(items)
    props = TensorProperties(torch.float32)
    shape = torch.Size((ROWS * ranks, COLS))
    whole = TensorWriteData(
        ChunkStorageMetadata(torch.Size((0, 0)), torch.Size((ROWS, COLS))), props, torch.Size((ROWS, COLS))
    )
    zero = torch.Size((0, 0))
    plans = []
    for rank in range(ranks):
        offsets = torch.Size((ROWS * rank, 0))
        shard = TensorWriteData(ChunkStorageMetadata(offsets, torch.Size((ROWS, COLS))), props, shape)
        plan_items = [
            WriteItem(MetadataIndex(f"s{i}", offsets), WriteItemType.SHARD, shard) for i in range(sharded)
        ]
        plan_items += [
            WriteItem(MetadataIndex(f"r{i}", zero), WriteItemType.TENSOR, whole) for i in range(replicated)
        ]
        plans.append(SavePlan(plan_items, planner_data={"containers": [], "paths": {}}))
    return plans


def dcp_plans(ranks: int, items: int) -> list[Any]:
    """The same plans in DCP's classes (its planner data maps every key to its path)."""
    from torch.distributed.checkpoint import metadata as dmd
    from torch.distributed.checkpoint import planner as dpl

    sharded, replicated = _split(items)
    props = dmd.TensorProperties(torch.float32)
    shape = torch.Size((ROWS * ranks, COLS))
    zero = torch.Size((0, 0))
    whole = dpl.TensorWriteData(
        dmd.ChunkStorageMetadata(zero, torch.Size((ROWS, COLS))), props, torch.Size((ROWS, COLS))
    )
    paths = {f"s{i}": (f"s{i}",) for i in range(sharded)} | {f"r{i}": (f"r{i}",) for i in range(replicated)}
    plans = []
    for rank in range(ranks):
        offsets = torch.Size((ROWS * rank, 0))
        shard = dpl.TensorWriteData(dmd.ChunkStorageMetadata(offsets, torch.Size((ROWS, COLS))), props, shape)
        plan_items = [
            dpl.WriteItem(
                index=dmd.MetadataIndex(f"s{i}", offsets), type=dpl.WriteItemType.SHARD, tensor_data=shard
            )
            for i in range(sharded)
        ]
        plan_items += [
            dpl.WriteItem(
                index=dmd.MetadataIndex(f"r{i}", zero), type=dpl.WriteItemType.TENSOR, tensor_data=whole
            )
            for i in range(replicated)
        ]
        plans.append(dpl.SavePlan(plan_items, planner_data=paths))
    return plans


def _step(times: dict[str, float], name: str, fn: Any) -> Any:
    """Run ``fn``; record its CPU seconds under ``name`` (the work is one thread
    of Python, so CPU time is what it costs even on a machine other jobs share)
    and its wall seconds under ``name + " wall"``."""
    gc.collect()
    gc.disable()  # as torchstow's protocol does during a save; for DCP too, to compare the algorithms
    try:
        start, cpu = time.perf_counter(), time.process_time()
        value = fn()
        times[name] = time.process_time() - cpu
        times[f"{name} wall"] = time.perf_counter() - start
    finally:
        gc.enable()
    return value


def rank_results(plan: Any) -> bytes:
    """What one rank sends the coordinator after writing ``plan`` (pickled, as a gather
    sends it): its layout writer's write results, columns made from each item's location
    as ``LayoutWriter.write_data`` makes them (every item packed into one file, one crc32c each)."""
    from torchstow.core.storage.interfaces import WrittenItems
    from torchstow.format.files import BLOCK_SIZE
    from torchstow.format.located import LocationColumns
    from torchstow.format.manifest import StorageInfo

    name = f"{plan.storage_data.prefix}-0.bin"
    offset = 0
    indices, infos, written = [], [], []
    for item in plan.items:
        length = item.tensor_storage_size() or 0
        indices.append(item.index)
        infos.append(StorageInfo(name, offset, length, (offset & 0xFFFFFFFF,), BLOCK_SIZE))
        written.append(length)
        offset += length + (-length % 64)
    return pickle.dumps(WrittenItems(LocationColumns.of(indices, infos, written)))


def _run_torchstow(ranks: int, items: int) -> dict[str, float]:
    from torchstow.backends.filesystem import LocalFileStore
    from torchstow.core.layout.writer import LayoutWriter
    from torchstow.core.planning import DefaultSavePlanner
    from torchstow.core.storage.interfaces import location_columns
    from torchstow.format.codec import decode_metadata, encode_manifest, encode_metadata
    from torchstow.format.files import chunk_table_name
    from torchstow.format.located import attach_locations

    plans = torchstow_plans(ranks, items)
    times: dict[str, float] = {}
    base = _memory_base()
    planned, metadata = _step(times, "global plan", partial(DefaultSavePlanner().create_global_plan, plans))
    writer = LayoutWriter(LocalFileStore("/nonexistent", "bench"))  # its global step touches no file
    final = _step(times, "writer plan", partial(writer.prepare_global_plan, planned))
    gathered = [rank_results(plan) for plan in final]  # each rank's, as it arrives (not timed)
    planned = final = plans = None
    # The gather unpickles them: timed apart, as the plans' unpickling is not timed either.
    results = _step(times, "unpickle results", lambda: [pickle.loads(g) for g in gathered])
    gathered = None
    metadata.committed_at = time.time()
    metadata.save_id = uuid.uuid4().hex
    # The commit (LayoutWriter.finish): every rank's columns -> the manifest's chunk table.
    table = partial(
        attach_locations, metadata, [location_columns(r) for r in results], chunk_table_name(metadata.save_id)
    )
    _step(times, "table", table)
    results = None
    manifest, tables = _step(times, "encode", partial(encode_manifest, metadata))  # version 2
    peak = _peak_mib(base)
    v1 = _step(times, "encode v1", partial(encode_metadata, metadata))
    metadata = None  # free the coordinator's state before decoding
    gc.collect()
    _step(times, "decode", partial(decode_metadata, manifest, read_file=lambda n, _: tables.get(n)))
    _step(times, "decode v1", partial(decode_metadata, v1))
    times["manifest MiB"] = (len(manifest) + sum(map(len, tables.values()))) / 2**20
    times["manifest v1 MiB"] = len(v1) / 2**20
    times["peak MiB"] = peak
    _startup(times, {"": (manifest, tables), " v1": (v1, {})})
    return times


def _startup(times: dict[str, float], versions: dict[str, tuple[bytes, dict[str, bytes]]]) -> None:
    """What ``info`` and a load's start (its reader's ``read_metadata``) take on the saved
    manifest (and chunk table) of each version, on local files: read from the page cache,
    decoded, validated (the data files are not needed for either)."""
    import torchstow

    with tempfile.TemporaryDirectory() as tmp:
        for suffix, (manifest, tables) in versions.items():
            path = os.path.join(tmp, f"ckpt{suffix.strip()}")
            os.makedirs(path)
            for name, data in {"manifest.json": manifest, **tables}.items():
                with open(os.path.join(path, name), "wb") as f:
                    f.write(data)
            _step(times, f"info{suffix}", partial(torchstow.info, path))
            _step(
                times,
                f"load start-up{suffix}",
                lambda path=path: torchstow.storage_reader(path).read_metadata(),
            )


def _run_dcp(ranks: int, items: int) -> dict[str, float]:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner as DcpPlanner
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    plans = dcp_plans(ranks, items)
    times: dict[str, float] = {}
    base = _memory_base()
    final, metadata = _step(times, "global plan", partial(DcpPlanner().create_global_plan, plans))
    storage = {}
    for rank, plan in enumerate(final):
        offset = 0
        for item in plan.items:
            length = ROWS * COLS * 4
            storage[item.index] = _StorageInfo(f"__{rank}_0.distcp", offset, length)
            offset += length
    metadata.storage_data = storage
    manifest = _step(times, "encode", partial(pickle.dumps, metadata, protocol=pickle.HIGHEST_PROTOCOL))
    peak = _peak_mib(base)
    final = metadata = None
    gc.collect()
    _step(times, "decode", partial(pickle.loads, manifest))
    times["manifest MiB"] = len(manifest) / 2**20
    times["peak MiB"] = peak
    return times


RUNNERS = {"torchstow": _run_torchstow, "dcp": _run_dcp}


def _child(name: str, ranks: int, items: int, out: Any) -> None:
    out.put(RUNNERS[name](ranks, items))


def measure(name: str, ranks: int, items: int) -> dict[str, float]:
    """One contender at one size, in a fresh process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "torchstow"])
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, ranks, items, out))
    proc.start()
    times = out.get()
    proc.join()
    return times


def sizes(ranks: int, items: int, base_only: bool = False) -> list[tuple[int, int]]:
    """The base size, half and double the ranks, half and double the items."""
    if base_only:
        return [(ranks, items)]
    return [(ranks // 2, items), (ranks, items // 2), (ranks, items), (ranks * 2, items), (ranks, items * 2)]


Found = dict[str, dict[tuple[int, int], dict[str, float]]]


def _best(name: str, ranks: int, items: int, repeats: int) -> dict[str, float]:
    runs = [measure(name, ranks, items) for _ in range(repeats)]
    best = {key: min(run[key] for run in runs) for key in runs[0]}
    steps = "  ".join(f"{k} {v:.3f}" for k, v in best.items() if not k.endswith(" wall"))
    print(f"  plan-scale {name:<10} {ranks:>5} ranks x {items:>5} items: {steps}", flush=True)
    return best


def source_ranks(ranks: int, cap: int) -> int:
    """The ranks DCP runs at to stand for ``ranks`` past the cap: halved until within it."""
    while ranks > cap:
        ranks //= 2
    return ranks


def run(
    ranks: int, items: int, repeats: int, dcp_max_ranks: int | None = None, base_only: bool = False
) -> tuple[Found, dict[tuple[int, int], tuple[int, dict[str, float]]]]:
    """Every contender at every size; the fastest of ``repeats`` runs per step.

    Returns the measured times, and DCP's extrapolated ones: for each size
    past ``dcp_max_ranks``, the ranks it was measured at and the times scaled
    to the size (none when the cap is 0: DCP is not run at all).
    """
    found: Found = {name: {} for name in RUNNERS}
    extrapolated: dict[tuple[int, int], tuple[int, dict[str, float]]] = {}
    for r, i in sizes(ranks, items, base_only):
        found["torchstow"][(r, i)] = _best("torchstow", r, i, repeats)
        if dcp_max_ranks is None or r <= dcp_max_ranks:
            found["dcp"][(r, i)] = _best("dcp", r, i, repeats)
            continue
        if not dcp_max_ranks:
            continue
        source = source_ranks(r, dcp_max_ranks)
        if (source, i) not in found["dcp"]:
            found["dcp"][(source, i)] = _best("dcp", source, i, repeats)
        scale = r / source
        times = {k: v * scale for k, v in found["dcp"][(source, i)].items()}
        extrapolated[(r, i)] = (source, times)
        steps = "  ".join(f"{k} {v:.3f}" for k, v in times.items() if not k.endswith(" wall"))
        print(
            f"  plan-scale dcp        {r:>5} ranks x {i:>5} items: EXTRAPOLATED from {source} ranks "
            f"(x{scale:g}), not measured: {steps}",
            flush=True,
        )
    return found, extrapolated


def planning_seconds(times: dict[str, float]) -> float:
    """Global plan through the encoded manifest (for torchstow: the chunk table made from
    the ranks' write results, then encoded)."""
    return sum(v for k, v in times.items() if k in ("global plan", "writer plan", "table", "encode"))


def total_seconds(times: dict[str, float]) -> float:
    """Global plan through the encoded manifest, then decoding (and validating) it."""
    return planning_seconds(times) + times["decode"]


Extrapolated = dict[tuple[int, int], tuple[int, dict[str, float]]]


def _series(
    ax: Any,
    by_size: dict[tuple[int, int], dict[str, float]],
    fixed: int,
    axis: int,
    value: Any,
    **style: Any,
) -> None:
    """Plot ``value(times)`` of the sizes whose other coordinate is ``fixed``, against coordinate ``axis``."""
    sizes = sorted(s for s in by_size if s[1 - axis] == fixed)
    if sizes:
        ax.plot([s[axis] for s in sizes], [value(by_size[s]) for s in sizes], **style)


def _global_plan(times: dict[str, float]) -> float:
    return times["global plan"]


def _decode(times: dict[str, float]) -> float:
    return times["decode"]


def _decode_v1(times: dict[str, float]) -> float:
    return times["decode v1"]


def _lines(ours: Any, theirs: Any, dcp_guess: Any) -> list[tuple[Any, Any, str, dict[str, Any]]]:
    """The plot's lines: (sizes, what of their times, label, style)."""
    blue, orange = {"color": "tab:blue"}, {"color": "tab:orange"}
    return [
        (ours, planning_seconds, "torchstow plan + table + encode", {**blue, "marker": "o"}),
        (ours, _global_plan, "torchstow global plan", {**blue, "marker": "s", "linestyle": "-."}),
        (ours, _decode, "torchstow decode (format 2)", {**blue, "marker": "x", "linestyle": ":"}),
        (
            ours,
            _decode_v1,
            "torchstow decode, format 1",
            {"color": "tab:gray", "marker": "x", "linestyle": ":"},
        ),
        (theirs, planning_seconds, "DCP plan + pickle", {**orange, "marker": "o"}),
        (theirs, _decode, "DCP unpickle", {**orange, "marker": "x", "linestyle": ":"}),
        (
            dcp_guess,
            planning_seconds,
            "DCP plan + pickle, extrapolated (not run)",
            {**orange, "marker": "o", "markerfacecolor": "none", "linestyle": "--"},
        ),
    ]


def plot(found: Found, path: str, ranks: int, items: int, extrapolated: Extrapolated | None = None) -> None:
    """CPU seconds against ranks (items fixed) and against items (ranks fixed):
    global plan + manifest encode, the global plan alone, and decoding; DCP's
    extrapolated points dashed, with hollow markers."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    dcp_guess = {size: times for size, (_, times) in (extrapolated or {}).items()}
    for ax, axis, fixed, label in (
        (panels[0], 0, items, f"simulated ranks ({items:,} items each)"),
        (panels[1], 1, ranks, f"items per rank ({ranks:,} ranks)"),
    ):
        ours, theirs = found.get("torchstow", {}), found.get("dcp", {})
        for by_size, value, name, style in _lines(ours, theirs, dcp_guess):
            _series(ax, by_size, fixed, axis, value, label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # equal slopes, equal growth: linear cost shows as parallel lines
        ticks = sorted({s[axis] for by in (ours, theirs, dcp_guess) for s in by if s[1 - axis] == fixed})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    panels[0].set_ylabel("CPU seconds (garbage collector off)")
    handles, labels = panels[0].get_legend_handles_labels()
    for handle, text in zip(*panels[1].get_legend_handles_labels(), strict=True):
        if text not in labels:
            handles.append(handle)
            labels.append(text)
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("Coordinator at scale: one process fed the local plans of many ranks", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _details(found: Found, extrapolated: Extrapolated, ranks: int, items: int) -> dict[str, Any]:
    """Every size's step times, JSON-shaped (sizes as "RANKSxITEMS")."""
    return {
        "ranks": ranks,
        "items": items,
        "found": {name: {f"{r}x{i}": t for (r, i), t in sizes.items()} for name, sizes in found.items()},
        "extrapolated": {f"{r}x{i}": [src, t] for (r, i), (src, t) in extrapolated.items()},
    }


def replot(report_json: str, path: str) -> None:
    """Draw the plot again from the ``details`` a run wrote into its JSON report."""
    import json

    with open(report_json) as f:
        details = json.load(f)["details"]["plan scale"]

    def size(text: str) -> tuple[int, int]:
        r, i = text.split("x")
        return int(r), int(i)

    found = {name: {size(k): t for k, t in sizes.items()} for name, sizes in details["found"].items()}
    extrapolated = {size(k): (src, t) for k, (src, t) in details["extrapolated"].items()}
    plot(found, path, details["ranks"], details["items"], extrapolated)


def main(
    root: str,
    repeats: int,
    report: Report,
    ranks: int = 1024,
    items: int = 2000,
    png: str | None = None,
    dcp_max_ranks: int | None = 512,
    base_only: bool = False,
) -> None:
    """Measure every size; record times, ratios vs DCP (measured, or extrapolated
    under a key that says so) and the linearity of torchstow."""
    print(f"plan scale: {ranks} simulated ranks x {items} items (and halves/doubles)", flush=True)
    found, extrapolated = run(ranks, items, repeats, dcp_max_ranks, base_only)
    base = (ranks, items)
    label = f"plan {ranks}x{items}"
    ours = report.add(Result(label, "plan", "torchstow", [planning_seconds(found["torchstow"][base])], 0))
    total = report.add(
        Result(label, "plan+decode", "torchstow", [total_seconds(found["torchstow"][base])], 0)
    )
    if base in found["dcp"]:
        theirs = report.add(Result(label, "plan", "dcp", [planning_seconds(found["dcp"][base])], 0))
        report.ratio(f"plan+manifest {ranks} ranks x {items} items vs DCP", ours, [theirs], 5.0)
        dcp_total = report.add(Result(label, "plan+decode", "dcp", [total_seconds(found["dcp"][base])], 0))
        report.ratio(f"plan+encode+decode {ranks} ranks x {items} items vs DCP", total, [dcp_total], 20.0)
    elif base in extrapolated:
        source, times = extrapolated[base]
        key = f"plan+manifest {ranks} ranks x {items} items vs DCP EXTRAPOLATED from {source} ranks"
        report.ratios[key] = planning_seconds(times) / ours.best
        print(f"  {key}: {report.ratios[key]:.2f}x (DCP not run at this size)", flush=True)
        key = f"plan+encode+decode {ranks} ranks x {items} items vs DCP EXTRAPOLATED from {source} ranks"
        report.ratios[key] = total_seconds(times) / total.best
        print(f"  {key}: {report.ratios[key]:.2f}x (DCP not run at this size)", flush=True)
    at_base = found["torchstow"][base]
    for what in ("decode", "info", "load start-up"):
        report.ratios[f"{what} {ranks}x{items}: format 2 vs 1 (x faster)"] = (
            at_base[f"{what} v1"] / at_base[what]
        )
        print(f"  {what}: format 2 {at_base[what]:.3f} s, format 1 {at_base[what + ' v1']:.3f} s", flush=True)
    for name in RUNNERS:
        t = found[name]
        if base not in t:
            continue
        report.ratios[f"{name} peak MiB at base"] = t[base]["peak MiB"]
        report.ratios[f"{name} manifest MiB at base"] = t[base]["manifest MiB"]
        at_base = planning_seconds(t[base])
        for what, size in (("2x ranks", (ranks * 2, items)), ("2x items", (ranks, items * 2))):
            if size in t:  # measured at both sizes only
                report.ratios[f"{name} plan time, {what}"] = planning_seconds(t[size]) / at_base
                report.ratios[f"{name} plan+decode time, {what}"] = total_seconds(t[size]) / total_seconds(
                    t[base]
                )
        if (ranks * 2, items) in t:
            decode = t[(ranks * 2, items)]["decode"] / t[base]["decode"]
            report.ratios[f"{name} decode time, 2x ranks"] = decode
    report.details["plan scale"] = _details(found, extrapolated, ranks, items)
    if png:
        plot(found, png, ranks, items, extrapolated)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--plot", default=None, help="write the plot to this PNG")
    parser.add_argument(
        "--dcp-max-ranks",
        type=int,
        default=512,
        help="run DCP up to this many ranks, extrapolate past it (0: never run DCP)",
    )
    parser.add_argument("--base-only", action="store_true", help="measure the base size only")
    parser.add_argument("--replot", metavar="JSON", help="only draw --plot again from a run's JSON report")
    args = parser.parse_args()
    if args.replot:
        replot(args.replot, args.plot or "docs/plan_scale.png")
        sys.exit()
    main(
        "",
        args.repeats,
        Report("coordinator scale"),
        args.ranks,
        args.items,
        args.plot,
        args.dcp_max_ranks,
        args.base_only,
    )
