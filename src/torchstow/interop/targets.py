"""The writers of :func:`torchstow.convert`: torchstow, DCP, ``torch.save`` and safetensors.

torchstow and DCP targets go through their own save protocols with a
planner that reads each tensor from the source when the writer asks for it
(the state dict it plans from holds zero-stride placeholders of one element),
so bytes stream through; safetensors shards are written header first, then
tensor by tensor (the next one read while one is written), and the index last.

:data:`TARGETS` is the table ``convert`` dispatches on: one :class:`Target` per
format, each refusing an existing output the same way
(:func:`check_destination`) unless ``overwrite``, and then replacing it whole.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchstow.api import storage_writer
from torchstow.backends.filesystem import LocalFileStore
from torchstow.core.layout.location import check_vacant
from torchstow.core.planning import DefaultSavePlanner, WriteItem, WriteItemType
from torchstow.core.protocol.steps import save_state_dict
from torchstow.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    PickleNotAllowedError,
    TorchstowError,
)
from torchstow.format.files import MANIFEST, temporary_name
from torchstow.interop import safetensors_format as stf
from torchstow.interop.sources import (
    DCP_METADATA,
    TensorSpec,
    file_at_or_above,
    file_in_the_way,
    index_shards,
    is_dcp,
    local_path,
)
from torchstow.plugins.resolve import backend_at

if TYPE_CHECKING:
    from torchstow.interop.convert import ConvertReport, Selection

__all__ = [
    "TARGETS",
    "Target",
    "TargetOptions",
    "check_destination",
    "no_place",
    "to_dcp",
    "to_safetensors",
    "to_torch",
    "to_torchstow",
]


def _placeholder(spec: TensorSpec) -> torch.Tensor:
    """A tensor of ``spec``'s dtype and shape backed by one element (every stride is 0)."""
    return torch.empty_strided(spec.shape, (0,) * len(spec.shape), dtype=spec.dtype)


def _plan_state(selection: Selection, report: ConvertReport) -> dict[Any, Any]:
    flat: dict[str, Any] = {}
    for key, spec in selection.specs.items():
        if spec is None:
            flat[key] = selection.read_object(key)
        else:
            flat[key] = _placeholder(spec)
            report.tensors += 1
            report.nbytes += spec.nbytes
    return selection.source.nest(flat) if selection.nested else flat


class _StreamingPlanner(DefaultSavePlanner):
    """torchstow's planner, with tensor data read from the source as each item is written."""

    def __init__(self, selection: Selection) -> None:
        super().__init__()
        self.selection = selection

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.selection.fetch(write_item.index.fqn)


def to_torchstow(
    selection: Selection,
    dst: str,
    storage_options: dict[str, Any],
    overwrite: bool,
    report: ConvertReport,
    compression: str | None = None,
) -> None:
    """Save the selection as a torchstow checkpoint at ``dst`` (any backend), compressed
    as ``save(..., compression=)`` does."""
    state = _plan_state(selection, report)
    writer = storage_writer(
        dst, storage_options=storage_options, overwrite=overwrite, compression=compression
    )
    save_state_dict(
        state,
        writer,
        planner=_StreamingPlanner(selection),
        user_metadata=dict(selection.source.user_metadata),
    )
    report.files.append(dst)


def to_dcp(selection: Selection, dst: str, overwrite: bool, report: ConvertReport) -> None:
    """Save the selection with ``torch.distributed.checkpoint``'s own FileSystemWriter.

    It is written into a new hidden folder inside ``dst`` (so on its file system, a
    mount point included) and moved in when complete (``.metadata`` last), so a
    failure leaves ``dst`` as it was. With
    ``overwrite``, an old DCP checkpoint's ``.metadata`` is removed before the
    new data files replace its own (a reader never pairs the two), and its data
    files that the new one does not name once the new one is in place.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException
    from torch.distributed.checkpoint.planner import WriteItemType as DcpItemType

    class StreamingDcpPlanner(dcp.DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == DcpItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return selection.fetch(write_item.index.fqn)

    state = _plan_state(selection, report)
    with _folder(dst):
        staging = tempfile.mkdtemp(prefix=".torchstow-convert-", dir=dst)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*assuming the intent is to save in a single process"
                )
                dcp.save(
                    state,
                    storage_writer=dcp.FileSystemWriter(staging),
                    planner=StreamingDcpPlanner(),
                    no_dist=True,
                )
            _move_dcp(staging, dst, overwrite)
        except DcpCheckpointException as exc:  # a BaseException: give back the error that caused it
            cause = next((failure for failure, _ in exc.failures.values()), None)
            if isinstance(cause, TorchstowError):
                raise cause from None
            raise TorchstowError(f"convert to DCP at {dst} failed: {cause or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report.files.append(dst)


@contextlib.contextmanager
def _folder(dst: str) -> Iterator[None]:
    """``dst`` made where it is missing, and removed again when the block ends if this made it
    and nothing is left in it (a conversion that failed leaves no empty folder behind)."""
    created = not os.path.exists(dst)
    os.makedirs(dst, exist_ok=True)
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty: the output moved in
                os.rmdir(dst)


def _move_dcp(staging: str, dst: str, overwrite: bool) -> None:
    """Move the DCP checkpoint written in ``staging`` to ``dst``, ``.metadata`` last."""
    old = {name for name in os.listdir(dst) if name.endswith(".distcp")}
    if old and not overwrite:
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    names = sorted(os.listdir(staging), key=lambda name: name == DCP_METADATA)
    if old:  # the old checkpoint goes first: never its .metadata over the new data files
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dst, DCP_METADATA))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(dst, name))
    for name in old.difference(names):  # named by the replaced .metadata only
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dst, name))


def to_torch(selection: Selection, dst: str, report: ConvertReport) -> None:
    """Write one ``torch.save`` file. The format is one pickle, so the state is in memory at once."""
    flat: dict[str, Any] = {}
    for key, spec in selection.specs.items():
        if spec is None:
            flat[key] = selection.read_object(key)
        else:
            flat[key] = selection.fetch(key)
            report.tensors += 1
            report.nbytes += spec.nbytes
    state = selection.source.nest(flat) if selection.nested else flat
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    tmp = _temporary(folder, os.path.basename(dst))
    try:
        with open(tmp, "xb") as out:
            torch.save(state, out)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    report.files.append(dst)


def _temporary(folder: str, name: str) -> str:
    """A new hidden name in ``folder`` to write ``name`` under before renaming it into
    place (opened with ``open``, so the file gets the usual permissions, not 0600)."""
    return os.path.join(folder, temporary_name(name, uuid.uuid4().hex[:12]))


class _ReadAhead:
    """``fetch`` for keys asked for in a known order: each call also starts reading the
    next key in a background thread, so reading overlaps writing (two tensors in memory)."""

    def __init__(self, keys: list[str], fetch: Callable[[str], torch.Tensor]) -> None:
        self._keys = keys
        self._position = {key: i for i, key in enumerate(keys)}
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="torchstow-read-ahead")
        self._pending: tuple[str, Future[torch.Tensor]] | None = None

    def __call__(self, key: str) -> torch.Tensor:
        pending, self._pending = self._pending, None
        tensor = pending[1].result() if pending is not None and pending[0] == key else self._fetch(key)
        following = self._position[key] + 1
        if following < len(self._keys):
            upcoming = self._keys[following]
            self._pending = (upcoming, self._pool.submit(self._fetch, upcoming))
        return tensor

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True, cancel_futures=True)


def to_safetensors(
    selection: Selection, dst: str, max_shard_bytes: int | None, overwrite: bool, report: ConvertReport
) -> None:
    """Write Hugging Face safetensors shards and their index into the directory ``dst``."""
    metadata = {"format": "pt"}
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for key, spec in selection.specs.items():
        if spec is None:
            try:
                value = selection.read_object(key)
            except PickleNotAllowedError:  # not a string (those need no pickle), so not kept
                report.skipped.append((key, "an object only full pickle reads: safetensors holds tensors"))
                continue
            if not isinstance(value, str):
                kind = type(value).__name__
                reason = f"a value of type {kind}: safetensors holds tensors (and strings, as metadata)"
                report.skipped.append((key, reason))
            elif key in metadata:  # "format": Hugging Face loads only files whose format it knows
                report.skipped.append((key, f"the header's {key!r} says the files are PyTorch's ('pt')"))
            else:
                metadata[key] = value
        elif key == stf.METADATA_KEY:
            report.skipped.append((key, f"safetensors reserves the name {key!r} for the header's metadata"))
        elif stf.safetensors_dtype(spec.dtype) is None:
            report.skipped.append((key, f"safetensors has no dtype for {spec.dtype}"))
        else:
            entries.append((key, spec.dtype, spec.shape))
    shards = stf.plan_shards(
        ((key, TensorSpec(dtype, shape).nbytes) for key, dtype, shape in entries),
        max_shard_bytes or stf.DEFAULT_MAX_SHARD_BYTES,
    )
    by_key = {e[0]: e for e in entries}
    index_path = os.path.join(dst, stf.INDEX)
    staged: dict[str, str] = {}  # final name -> the temporary file written first
    with _folder(dst):
        old = _safetensors_files(dst) if overwrite else set()
        fetch = _ReadAhead([key for shard in shards for key in shard.keys], selection.fetch)
        try:
            for shard in shards:
                staged[shard.name] = tmp = _temporary(dst, shard.name)
                with open(tmp, "xb") as out:
                    stf.write_shard(out, [by_key[k] for k in shard.keys], fetch, metadata)
            total = sum(shard.nbytes for shard in shards)
            staged[stf.INDEX] = tmp = _temporary(dst, stf.INDEX)
            with open(tmp, "x") as text:
                json.dump(stf.index_document(shards, total), text, indent=2, sort_keys=True)
                text.write("\n")
            # Every file is written: the old output goes (its index first, so no reader pairs
            # it with new shards), the new one moves in, its index last.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(index_path)
            for name, tmp in staged.items():
                os.replace(tmp, os.path.join(dst, name))
        except BaseException:
            for tmp in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
        finally:
            fetch.close()
    for name in old.difference(shard.name for shard in shards):  # named by the replaced index only
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(dst, name))
    report.tensors = len(entries)
    report.nbytes = sum(shard.nbytes for shard in shards)
    report.files.extend([*(os.path.join(dst, s.name) for s in shards), index_path])


def _safetensors_files(folder: str) -> set[str]:
    """The shard files of the safetensors output in ``folder``: those its index names
    (when it reads), and a single ``model.safetensors``."""
    names = {stf.SINGLE} if os.path.exists(os.path.join(folder, stf.SINGLE)) else set()
    index_path = os.path.join(folder, stf.INDEX)
    if os.path.exists(index_path):
        with contextlib.suppress(CorruptCheckpointError):  # an unreadable index names nothing
            names.update(index_shards(index_path))
    return names


@dataclass(frozen=True)
class TargetOptions:
    """What :func:`~torchstow.convert` passes every target's writer."""

    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)  # the destination's
    max_shard_bytes: int | None = None  # safetensors only
    compression: str | None = None  # torchstow only (save's compression=)


@dataclass(frozen=True)
class Target:
    """One format ``convert`` writes: its writer, whether it writes local paths only
    (else any backend, whose writer refuses an existing checkpoint itself), whether
    its output is a folder (else one file), and whether a checkpoint there (torchstow's
    or DCP's) is refused by kind before anything else."""

    name: str
    write: Callable[[Selection, str, TargetOptions, ConvertReport], None]
    local_only: bool = True
    folder: bool = True
    names_checkpoints: bool = False


def _other_formats(target: Target, dst: str) -> list[str]:
    """The checkpoint formats other than ``target``'s that the local folder ``dst`` holds."""
    path = local_path(dst)  # None for another scheme's URI
    if not target.folder or path is None or not os.path.isdir(path):
        return []
    names = set(os.listdir(path))
    held = {
        "torchstow": MANIFEST in names,
        "dcp": is_dcp(names),  # a .metadata beside a manifest is debris the manifest replaced
        "safetensors": stf.INDEX in names or stf.SINGLE in names,
    }
    return [name for name, there in held.items() if there and name != target.name]


def no_place(location: str, verb: str = "convert", done: str = "written") -> ValueError:
    """The error for a destination that is a local file or lies under one (``cp`` and
    ``convert`` alike): no checkpoint can be there, and ``overwrite`` never replaces a file."""
    return ValueError(
        f"cannot {verb} to {location}: it is a file, or lies under one, so it is no "
        f"place for a checkpoint (a directory or prefix); nothing was {done}"
    )


def _check_no_file_in_the_way(target: Target, dst: str, storage_options: dict[str, Any] | None) -> None:
    """ValueError where ``dst`` is (for a folder target) or lies under a local file, or is
    a directory where the target writes one file."""
    if not target.folder:  # a torch.save file: one may be there (replaced with overwrite), not above
        if os.path.isdir(dst):
            raise ValueError(
                f"cannot convert to {dst}: it is a directory, and {target.name} is written as one file; "
                f"nothing was written. Name the file (such as {os.path.join(dst, 'model.pt')})"
            )
        blocker = file_at_or_above(os.path.dirname(dst) or ".")
        if blocker is not None:
            raise ValueError(
                f"cannot convert to {dst}: it lies under {blocker}, which is a file, not a "
                "directory; nothing was written"
            )
    elif target.local_only:
        if file_at_or_above(dst) is not None:
            raise no_place(dst)
    elif file_in_the_way(backend_at(dst, storage_options)[1], dst) is not None:
        raise no_place(dst)


def check_destination(
    target: Target, dst: str, overwrite: bool, storage_options: dict[str, Any] | None = None
) -> None:
    """Refuse ``dst`` for ``target`` before anything is read: a local file where the output
    goes or above it (ValueError, as ``copy`` refuses one: ``overwrite`` never replaces a
    file), or a folder holding a checkpoint of another format (which would hide the new
    one, or be taken for it), even with ``overwrite``; without it, an existing output (a
    file, or a folder that is not empty): CheckpointExistsError. Nothing is changed.
    ``storage_options`` are the destination's (for a target on any backend)."""
    _check_no_file_in_the_way(target, dst, storage_options)
    others = _other_formats(target, dst)
    if others:
        raise CheckpointExistsError(
            f"{dst} holds a {others[0]} checkpoint, which a {target.name} one written beside it would "
            f"hide or be taken for; remove it first, or convert to another location (--overwrite "
            "replaces an output of the same format only)"
        )
    if not target.local_only:
        return  # the backend's writer refuses a committed checkpoint (any backend)
    if overwrite or not os.path.exists(dst):
        return
    if target.names_checkpoints:
        check_vacant(
            LocalFileStore(dst, dst),
            "the old one is gone from the moment the new one's files move in, when the conversion ends",
        )
    if not target.folder or os.listdir(dst):
        raise CheckpointExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "torchstow",
            lambda sel, dst, opts, rep: to_torchstow(
                sel, dst, opts.storage_options, opts.overwrite, rep, opts.compression
            ),
            local_only=False,
        ),
        Target(
            "dcp",
            lambda sel, dst, opts, rep: to_dcp(sel, dst, opts.overwrite, rep),
            names_checkpoints=True,
        ),
        Target("torch", lambda sel, dst, opts, rep: to_torch(sel, dst, rep), folder=False),
        Target(
            "safetensors",
            lambda sel, dst, opts, rep: to_safetensors(sel, dst, opts.max_shard_bytes, opts.overwrite, rep),
        ),
    )
}
