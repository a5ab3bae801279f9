"""``verify``: read every byte of a checkpoint and check every checksum."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from torchstow.core.layout.location import read_dcp_metadata, read_manifest
from torchstow.core.layout.reader import LayoutReader
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.store import ByteStore
from torchstow.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    TorchstowError,
)
from torchstow.format.files import DCP_METADATA, MANIFEST
from torchstow.format.manifest import Metadata, TensorStorageMetadata
from torchstow.format.validation import check_extents
from torchstow.management.datafiles import FileSpans, Found, Problem, StoredItems, manifest_rows, scan_rows
from torchstow.plugins.manager import default_registry

if TYPE_CHECKING:
    from torchstow.interop.sources import Source

__all__ = ["Problem", "ProgressCallback", "VerifyReport", "verify"]

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_just_done, total_bytes)`` while bytes move."""

_THREADS = 4


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    ``ok`` is True when every byte was read and matched its checksum;
    ``checked_bytes`` counts the data bytes read; ``problems`` names the key,
    file and byte offset of each thing wrong. ``format`` is the checkpoint's
    (``torchstow``, ``dcp``, ``safetensors``, ``torch``); ``checksums`` is False
    for the formats that store none: there every value was read and decoded.
    """

    uri: str
    checked_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    keys: int = 0
    format: str = "torchstow"
    checksums: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The JSON form the command prints (see docs/cli.md)."""
        return {
            "uri": self.uri,
            "ok": self.ok,
            "format": self.format,
            "checksums": self.checksums,
            "checked_bytes": self.checked_bytes,
            "files": self.files,
            "keys": self.keys,
            "problems": [
                {"key": p.key, "file": p.file, "offset": p.offset, "message": p.message}
                for p in self.problems
            ],
        }


def _counted(progress: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    if progress is None:
        return None
    lock = threading.Lock()

    def advance(nbytes: int) -> None:
        with lock:
            progress(nbytes, total)

    return advance


def verify_store(
    store: ByteStore, uri: str, metadata: Metadata, progress: ProgressCallback | None = None
) -> VerifyReport:
    """Check every data file of ``store`` against the checksums in ``metadata``."""
    report = VerifyReport(uri, keys=len(metadata.state_dict_metadata))
    items = StoredItems(metadata)
    found = manifest_rows(metadata, items)
    files = items.by_file()
    report.files = len(files)
    total = sum(spans.end for spans in files.values())
    advance = _counted(progress, total)

    def one(spans: FileSpans) -> list[Found]:
        return scan_rows(store, spans.name, spans, progress=advance)

    threads = min(_THREADS, len(files))
    if threads <= 1:
        results = [one(spans) for spans in files.values()]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="torchstow-verify") as pool:
            results = list(pool.map(one, files.values()))
    for more in results:
        found.extend(more)
    report.problems.extend(problem for _, problem in found)
    bad = torch.tensor(sorted({row for row, _ in found if row is not None}), dtype=torch.int64)
    report.checked_bytes = int(items.length.sum()) - int(items.length[bad].sum())
    return report


def verify_by_reading(
    source: Source, progress: ProgressCallback | None = None, report: VerifyReport | None = None
) -> VerifyReport:
    """Verify by reading every value through the source's own reader, key by key
    (backends that are not byte stores, and the formats without checksums); the keys
    ``report`` already names a problem of are not read."""
    if report is None:
        report = VerifyReport(source.uri, format=source.format, checksums=source.format == "torchstow")
    report.keys = len(source.specs)
    known = {p.key for p in report.problems}
    total = sum(spec.nbytes for spec in source.specs.values() if spec is not None)
    for key, spec in source.specs.items():
        if key in known:
            continue
        try:
            if spec is None:
                source.read_object(key)
            else:
                source.read_tensor(key)
                report.checked_bytes += spec.nbytes
                if progress is not None:
                    progress(spec.nbytes, total)
        except (TorchstowError, OSError) as exc:
            report.problems.append(Problem(key, None, None, " ".join(str(exc).split())))
    return report


def _verify_dcp(store: ByteStore, uri: str, progress: ProgressCallback | None) -> VerifyReport:
    """Read every value of a DCP-format checkpoint (DCP stores no checksums); a
    ``.metadata`` that does not decode, and locations in missing files or past their
    ends, are problems in the report."""
    from torchstow.interop.sources import DcpSource

    name = DCP_METADATA
    report = VerifyReport(uri, format="dcp", checksums=False)
    try:
        metadata = read_dcp_metadata(store)
    except (TorchstowError, OSError) as exc:
        report.problems.append(Problem(name, name, None, " ".join(str(exc).split())))
        return report
    locations = metadata.storage_data.items()
    report.files = len({info.relative_path for _, info in locations})
    sizes = store.file_sizes()
    if sizes is not None:  # what cannot be read is reported, and never allocated for
        beyond: dict[Any, str] = {}
        missing = check_extents(locations, sizes, store.location, beyond)
        for index, info in locations:
            if info.relative_path in missing:
                report.problems.append(
                    Problem(index.fqn, info.relative_path, None, "the data file is missing")
                )
            elif index in beyond:
                report.problems.append(Problem(index.fqn, info.relative_path, info.offset, beyond[index]))
    source = DcpSource(uri, metadata=metadata, reader=lambda: LayoutReader(store))
    return verify_by_reading(source, progress, report)


def _verify_file_source(uri: str, path: str, progress: ProgressCallback | None) -> VerifyReport:
    """Read every value of a safetensors file or folder, or a ``torch.save`` file
    (formats without checksums); one that does not open is a problem in the report."""
    from torchstow.interop.sources import SafetensorsSource, open_source

    try:
        source = open_source(path)
    except CheckpointNotFoundError:
        raise  # no checkpoint there (a checkpoint's manifest.json): nothing to report on
    except (TorchstowError, OSError) as exc:
        name = os.path.basename(os.path.normpath(path))
        kind = "safetensors" if os.path.isdir(path) or path.endswith(".safetensors") else "torch"
        message = " ".join(str(exc).split())
        return VerifyReport(uri, problems=[Problem(name, name, None, message)], format=kind, checksums=False)
    try:
        report = verify_by_reading(source, progress)
        report.uri = uri
        report.files = len(source.paths) if isinstance(source, SafetensorsSource) else 1
        return report
    finally:
        source.close()


def verify(
    uri: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Read every byte of the checkpoint at ``uri`` and check every checksum.

    Corruption (a flipped byte, a missing or truncated data file, an
    unreadable or inconsistent manifest, data without a committed manifest)
    is reported in the returned :class:`VerifyReport`, never raised. Raises
    :class:`CheckpointNotFoundError` when nothing is at ``uri``. The formats
    without checksums (DCP's, safetensors, a ``torch.save`` file) are verified
    by reading and decoding every value, and their metadata is checked for
    consistency; the report says so (``checksums`` is False).
    """
    from torchstow.interop.sources import TorchstowSource, is_dcp, is_safetensors, local_path

    text = os.fspath(uri)
    path = local_path(text)
    if path is not None and (os.path.isfile(path) or is_safetensors(path)):
        return _verify_file_source(text, path, progress)
    backend = default_registry().backend_for(text, storage_options)
    if not isinstance(backend, StoreBackend):
        return verify_by_reading(TorchstowSource(text, storage_options), progress)
    store = backend.open_store(text)
    if is_dcp(store.list_files()):
        return _verify_dcp(store, text, progress)
    try:
        metadata = read_manifest(store, dcp=True)  # DCP's .distcp without its .metadata: incomplete
    except (IncompleteCheckpointError, CorruptCheckpointError) as exc:
        return VerifyReport(text, problems=[Problem(MANIFEST, MANIFEST, None, str(exc))])
    report = verify_store(store, text, metadata, progress)
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and not entry.chunks and entry.size.numel():
            report.problems.append(Problem(fqn, None, None, "the manifest records no chunks"))
    return report
