"""The verbs of the ``torchstow`` command. Each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import math
import sys
from collections.abc import Iterator
from typing import Any

import torchstow
from torchstow.cli.render import (
    human_bytes,
    human_duration,
    human_time,
    key_tree,
    plural,
    print_json,
    progress_bar,
    stdout,
)
from torchstow.errors import CheckpointNotFoundError, IncompleteCheckpointError, TorchstowError
from torchstow.format.manifest import BytesStorageMetadata, dtype_name
from torchstow.interop.sources import Source, TorchstowSource, open_source
from torchstow.management.copy import copy_run
from torchstow.management.listing import COMMITTED, Entry, IsACheckpointError, children_of, is_link, scan
from torchstow.management.prune import counted, prune_listed
from torchstow.management.steps import step_of
from torchstow.plugins.manager import DISABLE_ENV, default_registry, disabled_plugins
from torchstow.plugins.resolve import backend_at, route_options

__all__ = ["VERBS"]


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    return dict(args.storage_option or [])


def _info_json(info: torchstow.CheckpointInfo, format: str) -> dict[str, Any]:
    return {
        "uri": info.uri,
        "format": format,
        "step": info.step,
        "committed_at": info.committed_at,
        "nbytes": info.nbytes,
        "nbytes_written": info.nbytes_written,
        "save_seconds": info.save_seconds,
        "num_entries": info.num_entries,
        "format_version": info.format_version if format == "torchstow" else None,
        "user_metadata": info.user_metadata,
    }


def _scan(args: argparse.Namespace) -> list[Entry]:
    """The checkpoint locations under ``args.prefix``; a checkpoint given as the prefix
    stands alone (as ``ls FILE`` shows the file), with a note on stderr."""
    try:
        with progress_bar(args.command, args.progress, unit="checkpoints") as progress:
            return scan(args.prefix, storage_options=_opts(args), progress=progress)
    except IsACheckpointError as exc:
        if not args.json:
            print(
                f"torchstow: {args.prefix} is a checkpoint; 'torchstow info {args.prefix}' shows more",
                file=sys.stderr,
            )
        return [exc.entry]


def _nothing_under(prefix: str, args: argparse.Namespace) -> bool:
    """Whether no location at all lies under ``prefix`` (a missing bucket is an error naming it)."""
    text, backend = backend_at(prefix, _opts(args))
    return not backend.list_children(text)


def _ls_tiers(args: argparse.Namespace) -> int:
    """``ls ROOT --tiers``: each step of a tiered run and the tiers holding it complete."""
    from torchstow.management.tiered.listing import tier_listing

    fast, rows = tier_listing(
        args.prefix, args.fast, storage_options=_opts(args), fast_storage_options=_opts(args)
    )
    if not rows and _nothing_under(args.prefix, args):
        # as for ls without --tiers: a typo is an error, not an empty run (exit 1, with --json too)
        also = f", and no step is in {fast}" if fast else ""
        raise CheckpointNotFoundError(f"nothing under {args.prefix}: it does not exist or is empty{also}")
    if args.json:
        steps = [
            {
                "step": r.step,
                "tiers": list(r.tiers),
                "fast_nodes": list(r.fast_nodes),
                "durable_uri": r.durable_uri,
            }
            for r in rows
        ]
        print_json({"root": args.prefix, "fast": fast, "steps": steps})
        return 0
    if fast is None:
        print(f"torchstow: no fast tier recorded under {args.prefix}; give it with --fast", file=sys.stderr)
    if not rows:
        print(f"no steps under {args.prefix}" + (f" or in {fast}" if fast else ""), file=sys.stderr)
        return 0
    print(f"{'STEP':>8}  {'TIERS':<14}  FAST NODES")
    for r in rows:
        nodes = ",".join(map(str, r.fast_nodes)) or "-"
        print(f"{r.step:>8}  {'+'.join(r.tiers):<14}  {nodes}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List the checkpoints under a prefix, oldest first (--all: incomplete and unreadable ones too;
    --tiers: a tiered run's steps and their tiers)."""
    if getattr(args, "tiers", False):
        return _ls_tiers(args)
    entries = [e for e in _scan(args) if args.all or e.status == COMMITTED]
    if args.json:
        print_json(
            {
                "prefix": args.prefix,
                "checkpoints": [
                    {
                        "uri": e.uri,
                        "status": e.status,
                        "format": e.format,
                        "step": e.step,
                        "committed_at": e.info.committed_at if e.info else None,
                        "nbytes": e.info.nbytes if e.info else None,
                        "nbytes_written": e.info.nbytes_written if e.info else None,
                        "save_seconds": e.info.save_seconds if e.info else None,
                        "num_entries": e.info.num_entries if e.info else None,
                        "user_metadata": e.info.user_metadata if e.info else None,
                        "error": e.error,
                    }
                    for e in entries
                ],
            }
        )
        return 0
    if not entries:
        print(f"no committed checkpoints under {args.prefix}", file=sys.stderr)
        return 0
    print(f"{'STEP':>8}  {'COMMITTED':<19}  {'SIZE':>10}  {'WRITTEN':>10}  {'TOOK':>8}  {'KEYS':>6}  URI")
    for e in entries:
        step = "-" if e.step is None else str(e.step)
        if e.info is not None:
            i = e.info
            row = f"{step:>8}  {human_time(i.committed_at):<19}  {human_bytes(i.nbytes):>10}  "
            row += f"{human_bytes(i.nbytes_written):>10}  {human_duration(i.save_seconds):>8}  "
            print(f"{row}{i.num_entries:>6}  {e.uri}")
        else:
            print(f"{step:>8}  {'(' + e.status + ')':<19}  {'-':>10}  {'-':>10}  {'-':>8}  {'-':>6}  {e.uri}")
    return 0


@contextlib.contextmanager
def _one_checkpoint(uri: str, args: argparse.Namespace) -> Iterator[None]:
    """Where no checkpoint is at ``uri`` but locations lie under it (a run), the error says
    so and how to see them, instead of only "no checkpoint"."""
    try:
        yield
    except CheckpointNotFoundError as exc:
        try:
            text, backend = backend_at(uri, _opts(args))
            under = children_of(backend, text)
        except Exception:  # the hint is a courtesy: the error stands as it is
            under = []
        if not under:
            raise
        first = under[0] + (", ..." if len(under) > 1 else "")
        raise CheckpointNotFoundError(
            f"{exc}: {uri} holds {plural(len(under), 'location')} ({first}), as a run does; "
            f"give one checkpoint ('torchstow ls {uri}' lists them)"
        ) from exc


def _source_summary(source: Source) -> dict[str, Any]:
    tensors = [s for s in source.specs.values() if s is not None]
    return {
        "uri": source.uri,
        "format": source.format,
        "step": step_of(source.uri, source.user_metadata),
        "committed_at": None,
        "nbytes": sum(s.nbytes for s in tensors),
        "nbytes_written": None,
        "save_seconds": None,
        "num_entries": len(source.specs),
        "format_version": None,
        "user_metadata": source.user_metadata,
    }


def cmd_info(args: argparse.Namespace) -> int:
    """Summarize a checkpoint from its metadata (no data read): format, step, size, user metadata."""
    with _one_checkpoint(args.uri, args):
        source = open_source(args.uri, _opts(args))
    try:
        if source.format in ("torchstow", "dcp"):  # the size ls and du show: the stored bytes
            doc = _info_json(torchstow.info(args.uri, storage_options=_opts(args)), source.format)
        else:
            doc = _source_summary(source)
    finally:
        source.close()
    if args.json:
        print_json(doc)
        return 0
    print(f"uri:            {doc['uri']}")
    print(
        f"format:         {doc['format']}"
        + (f" (version {doc['format_version']})" if doc["format_version"] else "")
    )
    print(f"step:           {'-' if doc['step'] is None else doc['step']}")
    print(f"committed at:   {human_time(doc['committed_at'])}")
    print(f"size:           {human_bytes(doc['nbytes'])} ({doc['nbytes']:,} bytes)")
    if doc["nbytes_written"] is not None:
        written = doc["nbytes_written"]
        print(f"written:        {human_bytes(written)} ({written:,} bytes)")
    print(f"save took:      {human_duration(doc['save_seconds'])}")
    print(f"entries:        {doc['num_entries']}")
    for key, value in doc["user_metadata"].items():
        print(f"metadata.{key}: {value!r}")
    return 0


def _object_value(source: Source, key: str) -> tuple[str, Any]:
    """A non-tensor value's type and (JSON-able) value, reading data only when it is already in memory."""
    if isinstance(source, TorchstowSource):
        entry = source.metadata.state_dict_metadata[key]
        assert isinstance(entry, BytesStorageMetadata)
        if entry.encoding != "json":
            return f"object ({entry.encoding}-encoded)", None
        value = entry.value
    else:
        value = source.read_object(key)
    # a JSON scalar as it is; NaN and infinities are none (strict JSON has no such number)
    scalar = isinstance(value, int | str | bool | type(None)) or (
        isinstance(value, float) and math.isfinite(value)
    )
    return type(value).__name__, value if scalar else repr(value)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show the keys of a checkpoint as a tree, with dtype, shape and size (PATTERN: a glob on keys)."""
    with _one_checkpoint(args.uri, args):
        source = open_source(args.uri, _opts(args))
    try:
        keys = []
        for key, spec in source.specs.items():
            if args.pattern and not fnmatch.fnmatchcase(key, args.pattern):
                continue
            if spec is None:
                kind, value = _object_value(source, key)
                keys.append({"key": key, "kind": "object", "type": kind, "value": value})
            else:
                keys.append(
                    {
                        "key": key,
                        "kind": "tensor",
                        "dtype": dtype_name(spec.dtype),
                        "shape": list(spec.shape),
                        "nbytes": spec.nbytes,
                    }
                )
    finally:
        source.close()
    total = sum(k.get("nbytes", 0) for k in keys)
    if args.pattern and not keys:  # an error with --json too: the exit status says the same
        raise KeyError(f"no key of {args.uri} matches {args.pattern!r}")
    if args.json:
        print_json({"uri": args.uri, "format": source.format, "keys": keys, "total_bytes": total})
        return 0
    rows = []
    for k in keys:
        if k["kind"] == "tensor":
            rows.append((k["key"], f"{k['dtype']} {k['shape']}  {human_bytes(k['nbytes'])}"))
        else:
            rows.append((k["key"], f"{k['type']} = {k['value']!r}" if k["value"] is not None else k["type"]))
    title = f"{args.uri} ({source.format}, {plural(len(keys), 'key')}, {human_bytes(total)})"
    stdout().print(key_tree(title, rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Read every byte of each checkpoint and check every checksum; exit 1 when any is corrupt."""
    reports = []
    # Of several URIs, one that cannot be verified (nothing there, a manifest of a newer
    # format, permission denied, a storage error) does not stop the others: each is named
    # at the end, as a script checking a list expects.
    failed: dict[str, TorchstowError | OSError] = {}
    for uri in args.uris:
        try:
            with _one_checkpoint(uri, args), progress_bar("verify", args.progress) as progress:
                report = torchstow.verify(uri, storage_options=_opts(args), progress=progress)
        except (TorchstowError, OSError) as exc:
            if len(args.uris) == 1:
                raise
            failed[uri] = exc
            continue
        reports.append(report)
        if not args.json:
            if report.ok and report.checksums:
                checked = f"{human_bytes(report.checked_bytes)} in {plural(report.files, 'file')}"
                print(f"OK       {uri} ({checked} checked)")
            elif report.ok:  # a format without checksums: say what reading it showed
                read = f"{plural(report.keys, 'value')}, {human_bytes(report.checked_bytes)} in "
                print(
                    f"OK       {uri} ({report.format}: {read}{plural(report.files, 'file')} read and "
                    f"decoded; the {report.format} format stores no checksums)"
                )
            else:
                print(f"CORRUPT  {uri} ({plural(len(report.problems), 'problem')})")
                for problem in report.problems:
                    print(f"  {problem}")
    ok = not failed and all(r.ok for r in reports)
    if args.json:
        missing = [uri for uri, exc in failed.items() if isinstance(exc, CheckpointNotFoundError)]
        errors = [{"uri": uri, "error": str(exc)} for uri, exc in failed.items() if uri not in missing]
        checkpoints = [r.to_json() for r in reports]
        print_json({"ok": ok, "checkpoints": checkpoints, "missing": missing, "errors": errors})
    if len(failed) == 1:
        raise next(iter(failed.values()))
    if failed:
        text = "; ".join(str(exc) if uri in str(exc) else f"{uri}: {exc}" for uri, exc in failed.items())
        nothing = all(isinstance(exc, CheckpointNotFoundError) for exc in failed.values())
        raise (CheckpointNotFoundError if nothing else TorchstowError)(text)
    return 0 if ok else 1


def _two_sides(args: argparse.Namespace, dst_backend: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    return route_options(
        args.src,
        args.dst,
        _opts(args),
        dict(args.src_option or []),
        dict(args.dst_option or []),
        dst_backend=dst_backend,
    )


def cmd_cp(args: argparse.Namespace) -> int:
    """Copy a checkpoint (or every committed one of a run) between any backends, verifying
    every checksum; commit last. DST/ copies into DST."""
    src_opts, dst_opts = _two_sides(args)
    try:
        torchstow.info(args.src, storage_options=src_opts)
    except IncompleteCheckpointError:
        pass  # copy says what is wrong with it
    except CheckpointNotFoundError:
        try:
            return _cp_run(args, src_opts, dst_opts)  # a run: the checkpoints under it
        except CheckpointNotFoundError as nothing:
            other = _convert_only(args.src, src_opts)
            if other is None:
                raise
            raise ValueError(
                f"{args.src} is a {other} checkpoint: cp copies torchstow and DCP checkpoints; "
                f"convert it instead (torchstow convert {args.src} DST --to torchstow)"
            ) from nothing
    with progress_bar("copy", args.progress) as progress:
        dst = torchstow.copy(
            args.src,
            args.dst,
            src_storage_options=src_opts,
            dst_storage_options=dst_opts,
            overwrite=args.overwrite,
            progress=progress,
            compression=args.compression,
        )
    info = torchstow.info(dst, storage_options=dst_opts)
    if args.json:
        print_json({"src": args.src, "dst": dst, "nbytes": info.nbytes, "num_entries": info.num_entries})
    else:
        print(f"copied {args.src} -> {dst} ({human_bytes(info.nbytes)}, {info.num_entries} entries)")
    return 0


def _convert_only(uri: str, options: dict[str, Any]) -> str | None:
    """The format of the checkpoint at ``uri`` when it is one ``convert`` reads but ``cp``
    does not copy (a ``torch.save`` file, safetensors); else None."""
    try:
        source = open_source(uri, options)
    except (TorchstowError, OSError, ValueError):
        return None
    source.close()
    return None if source.format in ("torchstow", "dcp") else source.format


def _cp_run(args: argparse.Namespace, src_opts: dict[str, Any], dst_opts: dict[str, Any]) -> int:
    with progress_bar("copy", args.progress) as progress:
        done = copy_run(
            args.src,
            args.dst,
            src_storage_options=src_opts,
            dst_storage_options=dst_opts,
            overwrite=args.overwrite,
            progress=progress,
            compression=args.compression,
        )
    infos = [(src, torchstow.info(dst, storage_options=dst_opts)) for src, dst in done.copied]
    if args.json:
        copied = [
            {"src": src, "dst": i.uri, "nbytes": i.nbytes, "num_entries": i.num_entries} for src, i in infos
        ]
        skipped = [{"uri": uri, "reason": why} for uri, why in done.skipped]
        print_json({"src": args.src, "dst": done.dst, "checkpoints": copied, "skipped": skipped})
        return 0
    for src, i in infos:
        print(f"copied {src} -> {i.uri} ({human_bytes(i.nbytes)}, {i.num_entries} entries)")
    for uri, why in done.skipped:
        print(f"torchstow: skipped {uri} ({why})", file=sys.stderr)
    print(f"copied {plural(len(infos), 'checkpoint')}, skipped {len(done.skipped)}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete a checkpoint (its manifest first, so it is never half valid); refuse while a
    save may be writing there (as gc leaves it alone), unless ``--force``."""
    with _one_checkpoint(args.uri, args):
        torchstow.delete(args.uri, storage_options=_opts(args), force=args.force)
    if args.json:
        print_json({"removed": args.uri})
    else:
        print(f"removed {args.uri}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    """Bytes of each committed checkpoint under a prefix, and the total."""
    found = [e for e in _scan(args) if e.info is not None]
    text, backend = backend_at(args.prefix, _opts(args))
    # a link under the prefix (latest -> step-300) holds the bytes of what it points at: not counted
    linked = {e.uri for e in found if e.uri != text and is_link(backend, e.uri)}
    counted = [e for e in found if e.uri not in linked]
    total = sum(e.info.nbytes for e in counted if e.info is not None)
    if args.json:
        rows = [
            {"uri": e.uri, "step": e.step, "nbytes": e.info.nbytes, "link": e.uri in linked}
            for e in found
            if e.info is not None
        ]
        print_json({"prefix": args.prefix, "checkpoints": rows, "total_bytes": total})
        return 0
    for e in found:
        assert e.info is not None
        note = "  (a symbolic link: not in the total)" if e.uri in linked else ""
        print(f"{human_bytes(e.info.nbytes):>10}  {e.uri}{note}")
    print(f"{human_bytes(total):>10}  total ({plural(len(counted), 'checkpoint')}, {total:,} bytes)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete older checkpoints, keeping the newest N and every K-th step (never the newest)."""
    # one listing for what is reported and what is deleted (prune would list the prefix again)
    committed = [e.info for e in scan(args.prefix, storage_options=_opts(args)) if e.info is not None]
    backend = backend_at(args.prefix, _opts(args))[1]
    before = [i.uri for i in committed]
    # best, final (no step) and links: neither counted nor deleted
    uncounted = [i.uri for i in committed if not counted(backend, i)]
    with progress_bar("prune", args.progress, unit="checkpoints") as progress:
        deleted = prune_listed(
            args.prefix,
            committed,
            keep_last=args.keep_last,
            keep_every=args.keep_every,
            dry_run=args.dry_run,
            storage_options=_opts(args),
            progress=progress,
        )
    kept = [uri for uri in before if uri not in deleted]
    if args.json:
        print_json(
            {
                "prefix": args.prefix,
                "dry_run": args.dry_run,
                "deleted": deleted,
                "kept": kept,
                "not_counted": uncounted,
            }
        )
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for uri in deleted:
        print(f"{verb} {uri}")
    note = f"; not counted (no step, or a link): {', '.join(uncounted)}" if uncounted else ""
    print(f"{verb} {len(deleted)}, kept {len(kept)}{note}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove what killed saves left (unreferenced data, incomplete checkpoints, stray uploads)."""
    report = torchstow.gc(
        args.prefix, older_than=args.older_than, dry_run=args.dry_run, storage_options=_opts(args)
    )
    if args.json:
        print_json(report.to_dict())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for uri in report.removed:
        print(f"{verb} {uri}")
    for uri in report.aborted:
        print(f"{'would abort' if args.dry_run else 'aborted'} the upload of {uri}")
    for where, why in report.skipped.items():
        print(f"skipped {where}: {why}")
    print(
        f"{verb} {plural(len(report.removed), 'file')} ({human_bytes(report.bytes_freed)}), "
        f"{plural(len(report.aborted), 'upload')}; kept {len(report.kept)} younger than "
        f"{args.older_than:g}s"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert between torchstow, DCP, torch.save and Hugging Face safetensors (streaming)."""
    src_opts, dst_opts = _two_sides(args, dst_backend=args.to == "torchstow")
    with progress_bar("convert", args.progress) as progress:
        report = torchstow.convert(
            args.src,
            args.dst,
            to=args.to,
            keys=args.keys,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_size,
            src_storage_options=src_opts,
            dst_storage_options=dst_opts,
            overwrite=args.overwrite,
            progress=progress,
            compression=args.compression,
        )
    if args.json:
        print_json(report.to_json())
        return 0
    for key, reason in report.skipped:
        print(f"torchstow: skipped {key!r}: {reason}", file=sys.stderr)
    files = plural(len(report.files), "file")
    print(
        f"converted {args.src} ({report.source_format}) -> {args.dst} ({args.to}): "
        f"{plural(report.tensors, 'tensor')}, {human_bytes(report.nbytes)} in {files}"
    )
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    """List the installed backends: schemes, classes, plugins and their versions."""
    registry = default_registry()
    if args.json:
        print_json(
            {
                "backends": [
                    {
                        "scheme": e.scheme,
                        "backend": f"{e.backend.__module__}.{e.backend.__name__}",
                        "plugin": e.plugin,
                        "distribution": e.distribution,
                        "version": e.version,
                        "preferred": e.preferred,
                    }
                    for e in registry.available()
                ],
                "broken_plugins": dict(sorted(registry.load_errors.items())),
                "blocked_plugins": sorted(disabled_plugins()),
            }
        )
        return 0
    for entry in registry.available():
        source = f"{entry.distribution} {entry.version}" if entry.distribution else "registered by hand"
        name = f"{entry.backend.__module__}.{entry.backend.__name__}"
        preferred = "  [preferred]" if entry.preferred else ""
        print(f"{entry.scheme:<10} {name:<48} plugin {entry.plugin!r} ({source}){preferred}")
    for name, error in sorted(registry.load_errors.items()):
        print(f"broken plugin {name!r}: {error}")
    blocked = sorted(disabled_plugins())
    if blocked:
        print(f"blocked by {DISABLE_ENV}: {', '.join(blocked)}")
    return 0


VERBS = {
    "ls": cmd_ls,
    "info": cmd_info,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "cp": cmd_cp,
    "rm": cmd_rm,
    "du": cmd_du,
    "prune": cmd_prune,
    "gc": cmd_gc,
    "convert": cmd_convert,
    "backends": cmd_backends,
}
