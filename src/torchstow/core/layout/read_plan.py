"""How one read item's bytes are read: whole stored chunks straight into their target,
contiguous spans into a region, strided regions through a scratch buffer; every read
is widened to whole checksum blocks so what is read is verified. A compressed item
is read whole and verified, then decompressed (into its target where it fills it,
else into a scratch chunk whose region is copied over)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from torchstow.core.layout.compression import decompress_bytes, decompress_into
from torchstow.core.layout.digest_memo import forget
from torchstow.core.layout.views import tensor_bytes
from torchstow.core.planning import ReadItem
from torchstow.errors import ChecksumMismatchError, CorruptCheckpointError
from torchstow.format import chunks as chunk_math
from torchstow.format.checksums import BlockVerifier, block_bytes, block_span
from torchstow.format.manifest import StorageInfo

__all__ = ["PlannedRead", "ReadTask", "plan_read"]


@dataclass
class ReadTask:
    """One read item, where its bytes are stored, and the tensor they go to."""

    item: ReadItem
    info: StorageInfo
    target: torch.Tensor | None  # None for a non-tensor item
    dtype: torch.dtype | None
    chunk_sizes: torch.Size | None
    payload: bytes = b""


class PlannedRead:
    """The byte ranges one task reads, its checksum verifier, and how to finish it."""

    __slots__ = ("direct", "pieces", "scratch", "strided_view", "task", "verifier")

    def __init__(self, task: ReadTask) -> None:
        self.task = task
        self.pieces: list[tuple[int, memoryview]] = []
        self.verifier: BlockVerifier | None = None
        self.direct: torch.Tensor | None = None
        self.scratch: Any = None
        self.strided_view: torch.Tensor | None = None

    def finish(self, location: str, verify: bool) -> None:
        """Check the last block, then move the bytes where they belong."""
        if verify and self.verifier is not None:
            self._raise_if_bad(self.verifier.end(), location)
        task = self.task
        if task.info.codec is not None:
            try:
                self._decompress()
            except CorruptCheckpointError as exc:
                fqn = task.item.storage_index.fqn
                raise CorruptCheckpointError(
                    f"{location}/{task.info.relative_path}: the {task.info.codec} bytes of {fqn!r} at "
                    f"{task.info.offset}..{task.info.offset + task.info.length} {exc}"
                ) from exc
        elif task.target is None:
            task.payload = bytes(self.pieces[0][1])
        elif self.strided_view is not None:
            with torch.no_grad():
                task.target.copy_(self.strided_view)
        elif self.direct is not None and self.direct is not task.target:
            with torch.no_grad():
                task.target.copy_(self.direct)

    def _decompress(self) -> None:
        """Decode the compressed item read whole into ``scratch``, into its target."""
        task = self.task
        codec = task.info.codec
        assert codec is not None
        stored = tensor_bytes(self.scratch).cast("B")
        if task.target is None:
            task.payload = decompress_bytes(stored, codec)
            return
        assert task.dtype is not None and task.chunk_sizes is not None
        if self.direct is not None:  # the whole chunk, straight into its target
            decompress_into(stored, codec, task.dtype, self.direct)
            return
        chunk = torch.empty(task.chunk_sizes, dtype=task.dtype)
        decompress_into(stored, codec, task.dtype, chunk)
        with torch.no_grad():
            task.target.copy_(chunk_math.region(chunk, task.item.storage_offsets, task.item.lengths))

    def _raise_if_bad(self, bad: int | None, location: str) -> None:
        if bad is not None:
            self.fail(bad, location)

    def fail(self, bad: int, location: str) -> NoReturn:
        """Raise the mismatch of checksum block ``bad`` of this task's bytes."""
        raise checksum_mismatch(self.task.item.storage_index.fqn, location, self.task.info, bad)


def checksum_mismatch(fqn: str, location: str, info: StorageInfo, bad: int) -> ChecksumMismatchError:
    """The error for checksum block ``bad`` of ``fqn``'s bytes at ``info``, naming its byte range."""
    lo, hi = (info.offset + at for at in block_span(bad, info.block_size, info.length))
    return ChecksumMismatchError(
        f"checksum mismatch in {fqn!r}: {location}/{info.relative_path} "
        f"bytes {lo}..{hi} differ from what was saved; the checkpoint is corrupted"
    )


def plan_read(task: ReadTask) -> PlannedRead:
    """The byte ranges that fill ``task``'s target, extended to whole checksum blocks."""
    info = task.info
    read = PlannedRead(task)
    block = block_bytes(info.block_size, info.length)
    if info.codec is not None:
        return _plan_compressed(read, block)
    if task.target is None:
        buf = memoryview(bytearray(info.length))
        read.pieces = [(info.offset, buf)]
        read.verifier = BlockVerifier(0, info.checksums, block)
        return read
    assert task.dtype is not None
    assert task.chunk_sizes is not None
    item = task.item
    target = task.target
    direct = (
        target.is_cpu
        and target.dtype == task.dtype
        and target.is_contiguous()
        and not (target.is_conj() or target.is_neg())  # raw bytes would land under the flag
    )
    if direct:
        forget(target)  # its bytes change without its version counter moving
    if direct and item.lengths == task.chunk_sizes:
        # The common case: a whole stored chunk straight into its target.
        read.direct = target
        if info.length:
            read.pieces = [(info.offset, tensor_bytes(target))]
            read.verifier = BlockVerifier(0, info.checksums, block)
        return read
    itemsize = task.dtype.itemsize
    span = chunk_math.contiguous_span(task.chunk_sizes, item.storage_offsets, item.lengths)
    if span is not None:
        start = span[0] * itemsize
        length = span[1] * itemsize
        if length == 0:
            return read
        dest = target if direct else torch.empty(item.lengths, dtype=task.dtype)
        read.direct = dest
        body = tensor_bytes(dest)
    else:
        # A strided region: read the rows from its first to its last byte.
        strides = _row_major_strides(task.chunk_sizes)
        first = sum(o * s for o, s in zip(item.storage_offsets, strides, strict=True))
        last = first + sum((n - 1) * s for n, s in zip(item.lengths, strides, strict=True))
        start = first * itemsize
        length = (last + 1 - first) * itemsize
        raw = torch.empty(length, dtype=torch.uint8)
        body = tensor_bytes(raw)
        read.strided_view = raw.view(task.dtype).as_strided(item.lengths, strides, 0)
        read.scratch = raw
    # Extend the read to whole checksum blocks so every byte read is verified.
    head_start = (start // block) * block
    tail_end = min(info.length, -(-(start + length) // block) * block)
    if head_start < start:
        read.pieces.append((info.offset + head_start, memoryview(bytearray(start - head_start))))
    read.pieces.append((info.offset + start, body))
    if start + length < tail_end:
        read.pieces.append((info.offset + start + length, memoryview(bytearray(tail_end - start - length))))
    read.verifier = BlockVerifier(head_start // block, info.checksums, block)
    return read


def _plan_compressed(read: PlannedRead, block: int) -> PlannedRead:
    """A compressed item: its stored bytes read whole into a scratch buffer and verified,
    whatever part of it the item needs (``finish`` decompresses them)."""
    task = read.task
    info = task.info
    read.scratch = torch.empty(info.length, dtype=torch.uint8)  # no need to zero it: all read
    if info.length:
        read.pieces = [(info.offset, tensor_bytes(read.scratch))]
    read.verifier = BlockVerifier(0, info.checksums, block)
    target = task.target
    if (
        target is not None
        and task.item.lengths == task.chunk_sizes
        and target.is_cpu
        and target.dtype == task.dtype
        and target.is_contiguous()
        and not (target.is_conj() or target.is_neg())
    ):
        forget(target)  # its bytes change without its version counter moving
        read.direct = target
    return read


def _row_major_strides(sizes: Sequence[int]) -> list[int]:
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * sizes[d + 1]
    return strides
