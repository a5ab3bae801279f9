"""Streaming over a checkpoint's data files, checking every block checksum on the way.

:func:`scan_file` reads one data file front to back in bounded segments,
feeds each item's bytes to a :class:`~torchstow.format.checksums.BlockVerifier`
(the readers' own) and reports every block that differs, a missing file or one
that ends early. :func:`verify` reports what it finds; :func:`copy` hands each
segment to a sink of the destination too.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError
from torchstow.format.checksums import BlockVerifier, block_bytes, block_span
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata

__all__ = ["Problem", "Span", "check_manifest", "scan_file", "segment_bytes", "spans_by_file"]

_MIN_SEGMENT = 4 << 20
_MAX_SEGMENT = 64 << 20

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: which key, in which file, at which byte offset.

    ``file`` and ``offset`` are None when the problem is in the manifest itself.
    """

    key: str
    file: str | None
    offset: int | None
    message: str

    def __str__(self) -> str:
        where = (
            ""
            if self.file is None
            else f" in {self.file}" + ("" if self.offset is None else f" at byte {self.offset}")
        )
        return f"{self.key!r}{where}: {self.message}"


@dataclass(frozen=True)
class Span:
    """One stored item: the key it belongs to and where its bytes are."""

    key: str
    info: StorageInfo

    @property
    def end(self) -> int:
        return self.info.offset + self.info.length


def _key_name(metadata: Metadata, index: MetadataIndex) -> str:
    entry = metadata.state_dict_metadata.get(index.fqn)
    if isinstance(entry, TensorStorageMetadata) and len(entry.chunks) > 1 and index.offset is not None:
        return f"{index.fqn}[chunk at {list(index.offset)}]"
    return index.fqn


def spans_by_file(metadata: Metadata) -> dict[str, list[Span]]:
    """The stored items of ``metadata``, grouped by data file, in offset order."""
    locations = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    files: dict[str, list[Span]] = {}
    for index, info in locations.items():
        files.setdefault(info.relative_path, []).append(Span(_key_name(metadata, index), info))
    for spans in files.values():
        spans.sort(key=lambda s: s.info.offset)
    return files


def check_manifest(metadata: Metadata) -> list[Problem]:
    """What the manifest itself gets wrong: stored chunks without a location,
    locations whose length does not match the chunk, checksums that do not
    cover the item."""
    problems = []
    locations = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            if entry.encoding != "json" and MetadataIndex(fqn) not in locations:
                problems.append(Problem(fqn, None, None, "the manifest records no data location"))
            continue
        for chunk in entry.chunks:
            info = locations.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                if math.prod(chunk.sizes):
                    problems.append(
                        Problem(fqn, None, None, f"no data location for chunk {list(chunk.offsets)}")
                    )
                continue
            expected = math.prod(chunk.sizes) * entry.properties.dtype.itemsize
            if info.codec is None and info.length != expected:  # compressed: its own length
                problems.append(
                    Problem(
                        fqn,
                        info.relative_path,
                        info.offset,
                        f"the manifest records {info.length} bytes, but the chunk needs {expected}",
                    )
                )
    for index, info in locations.items():
        if not _checksums_cover(info):
            problems.append(
                Problem(
                    _key_name(metadata, index),
                    info.relative_path,
                    info.offset,
                    f"the manifest records {len(info.checksums)} checksums for {info.length} bytes",
                )
            )
    return problems


def segment_bytes(store: ByteStore) -> int:
    """How much one read of a streaming scan covers on ``store``."""
    return max(_MIN_SEGMENT, min(_MAX_SEGMENT, store.read_segment_bytes))


def _checksums_cover(info: StorageInfo) -> bool:
    """Whether an item has one checksum per block."""
    return len(info.checksums) == -(-info.length // block_bytes(info.block_size, info.length))


def _verifiers(spans: list[Span]) -> list[tuple[Span, BlockVerifier]]:
    """A verifier for each span whose checksums cover it (:func:`check_manifest` reports the others)."""
    return [
        (span, BlockVerifier(0, span.info.checksums, block_bytes(span.info.block_size, span.info.length)))
        for span in spans
        if _checksums_cover(span.info)
    ]


def _ends_early(store: ByteStore, name: str, end: int, exc: CorruptCheckpointError) -> str:
    """What a data file that ends before ``end`` lacks, by its size at the store (the
    read's own error where the store cannot tell sizes)."""
    size = (store.file_sizes() or {}).get(name)
    if size is None or size >= end:
        return f"the data file ends early: {exc}"
    return (
        f"the data file ends early: it holds {size:,} bytes, the manifest needs {end:,} "
        f"({end - size:,} bytes missing)"
    )


def scan_file(
    store: ByteStore,
    name: str,
    spans: list[Span],
    *,
    write: Callable[[memoryview], None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    write_keeps: bool = True,
) -> list[Problem]:
    """Read ``name`` from its start to the end of its last item, checking every block.

    Each segment read is passed to ``write`` (when given) before the next is
    read, so a copy holds one segment at a time: a fresh one for each, unless
    ``write_keeps`` is False (``write`` is done with a segment when it
    returns), when one buffer serves them all. ``progress`` is called with
    the number of bytes of each segment. Stops early (returning what it
    found so far) when ``stop`` is set.
    """
    if not spans:
        return []
    end = max(span.end for span in spans)
    checked = _verifiers(spans)
    problems: list[Problem] = []
    seg = segment_bytes(store)
    # Reading alone reuses one buffer, and so does a copy into a sink that keeps no buffer
    # (fresh memory costs page faults, a lot of them on some virtual machines).
    scratch = memoryview(bytearray(min(seg, end))) if write is None or not write_keeps else None
    first = 0  # the first span not yet fully checked
    pos = 0
    while pos < end:
        if stop is not None and stop.is_set():
            return problems
        size = min(seg, end - pos)
        buf = scratch[:size] if scratch is not None else memoryview(bytearray(size))
        try:
            store.read_into(name, [(pos, buf)])
        except FileNotFoundError:
            return [Problem(s.key, name, s.info.offset, "the data file is missing") for s in spans]
        except CorruptCheckpointError as exc:
            cut = [s for s in spans if s.end > pos]
            message = _ends_early(store, name, end, exc)
            return problems + [Problem(s.key, name, max(pos, s.info.offset), message) for s in cut]
        seg_end = pos + size
        i = first
        while i < len(checked) and checked[i][0].info.offset < seg_end:
            span, verifier = checked[i]
            lo = max(span.info.offset, pos)
            hi = min(span.end, seg_end)
            if hi > lo:
                verifier.feed(buf[lo - pos : hi - pos])
            if span.end <= seg_end:
                if span.end > pos:
                    verifier.end()
                if i == first:
                    first += 1
            if verifier.failed:
                problems.extend(_mismatch(name, span, block) for block in verifier.failed)
                verifier.failed.clear()
            i += 1
        if write is not None:
            write(buf)
        if progress is not None:
            progress(size)
        pos = seg_end
    return problems


def _mismatch(name: str, span: Span, block: int) -> Problem:
    start, end = (span.info.offset + at for at in block_span(block, span.info.block_size, span.info.length))
    return Problem(
        span.key, name, start, f"checksum mismatch in bytes {start}..{end}: they differ from what was saved"
    )
