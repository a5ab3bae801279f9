"""``verify``: read every byte of a checkpoint and check every checksum."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torchstow.core.layout.location import read_manifest
from torchstow.core.storage.backend import StoreBackend
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError, IncompleteCheckpointError, TorchstowError
from torchstow.format.files import MANIFEST
from torchstow.format.manifest import Metadata, TensorStorageMetadata
from torchstow.management.datafiles import Problem, Span, check_manifest, scan_file, spans_by_file
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
    file and byte offset of each thing wrong.
    """

    uri: str
    checked_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    keys: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """The JSON form the command prints (see docs/cli.md)."""
        return {
            "uri": self.uri,
            "ok": self.ok,
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
    report.problems.extend(check_manifest(metadata))
    files = spans_by_file(metadata)
    report.files = len(files)
    total = sum(max(s.end for s in spans) for spans in files.values())
    advance = _counted(progress, total)

    def one(item: tuple[str, list[Span]]) -> list[Problem]:
        return scan_file(store, item[0], item[1], progress=advance)

    threads = min(_THREADS, len(files))
    if threads <= 1:
        results = [one(item) for item in files.items()]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="torchstow-verify") as pool:
            results = list(pool.map(one, files.items()))
    for problems in results:
        report.problems.extend(problems)
    bad = {(p.file, p.key) for p in report.problems}
    report.checked_bytes = sum(
        s.info.length for name, spans in files.items() for s in spans if (name, s.key) not in bad
    )
    return report


def verify_by_reading(source: Source, progress: ProgressCallback | None = None) -> VerifyReport:
    """Verify by reading every value through the source's own reader, key by key
    (backends that are not byte stores, and DCP checkpoints)."""
    report = VerifyReport(source.uri, keys=len(source.specs))
    total = sum(spec.nbytes for spec in source.specs.values() if spec is not None)
    for key, spec in source.specs.items():
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
    :class:`CheckpointNotFoundError` when nothing is at ``uri``. DCP-format
    checkpoints have no checksums: every byte is read and their metadata is
    checked for consistency.
    """
    from torchstow.interop.sources import TorchstowSource, dcp_source, is_dcp

    text = os.fspath(uri)
    backend = default_registry().backend_for(text, storage_options)
    if not isinstance(backend, StoreBackend):
        return verify_by_reading(TorchstowSource(text, storage_options), progress)
    store = backend.open_store(text)
    if is_dcp(store.list_files()):
        return verify_by_reading(dcp_source(text, storage_options), progress)
    try:
        metadata = read_manifest(store)
    except (IncompleteCheckpointError, CorruptCheckpointError) as exc:
        return VerifyReport(text, problems=[Problem(MANIFEST, MANIFEST, None, str(exc))])
    report = verify_store(store, text, metadata, progress)
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata) and not entry.chunks and entry.size.numel():
            report.problems.append(Problem(fqn, None, None, "the manifest records no chunks"))
    return report
