"""Names and packing of a checkpoint's files: the part of the format every byte store sees.

A checkpoint location holds one manifest, data files named
``data-<save id>-<rank>-<n>.bin`` (a new save id per save, so a save never
touches the files of the checkpoint it replaces), for a version-2 manifest
its chunk table ``manifest-<save id>.chunks`` (the manifest's own save id) and, while a manifest is
being published, a temporary file ``.<manifest>.<token>.tmp``. A byte store
that publishes through a temporary name must use :func:`temporary_name`, so
that ``delete`` and the incomplete-checkpoint check recognise the debris of
an interrupted publish.
"""

from __future__ import annotations

import re

from torchstow.errors import CorruptCheckpointError

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_TABLE_MAX_BYTES",
    "DCP_METADATA",
    "LARGE_ALIGN",
    "LARGE_ITEM",
    "MANIFEST",
    "MANIFEST_MAX_BYTES",
    "SMALL_ALIGN",
    "alignment",
    "chunk_table_name",
    "data_file_name",
    "data_file_prefix",
    "is_checkpoint_file",
    "is_chunk_table",
    "is_data_file",
    "is_manifest_file",
    "is_temporary",
    "save_id_of",
    "temporary_name",
    "too_large",
]

MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
"""The metadata file of a checkpoint in ``torch.distributed.checkpoint``'s own format (not this one),
which a location may hold instead of :data:`MANIFEST`."""
MANIFEST_MAX_BYTES = 1 << 30
"""The most bytes a reader reads of :data:`MANIFEST` (any version) or of
:data:`DCP_METADATA`, and the most a save writes as a manifest: a version-1 manifest is
about 85 bytes a chunk (165 MiB at two million chunks), so this is over 12 million."""
CHUNK_TABLE_MAX_BYTES = 4 << 30
"""The most bytes a version-2 manifest may record for its chunk table (70 to 110 bytes
a chunk: tens of millions of chunks)."""
BLOCK_SIZE = 4 << 20
"""Bytes per checksum block of an item (the last block may be shorter)."""
SMALL_ALIGN = 64
LARGE_ALIGN = 4096
LARGE_ITEM = 1 << 20
"""Items of at least this many bytes start at a multiple of LARGE_ALIGN, others of SMALL_ALIGN."""


def alignment(length: int) -> int:
    """The byte boundary an item of ``length`` bytes starts at in a data file."""
    return LARGE_ALIGN if length >= LARGE_ITEM else SMALL_ALIGN


def too_large(where: str, limit: int) -> CorruptCheckpointError:
    """The error for a file ``where`` that holds more than ``limit`` bytes, the most
    torchstow reads of it whole (a manifest, a chunk table, a small JSON file)."""
    return CorruptCheckpointError(
        f"{where} holds more than {limit:,} bytes, the most torchstow reads of such a file "
        "(docs/format.md, 'Sizes'): it is damaged, or no file torchstow wrote"
    )


def data_file_prefix(save_id: str, rank: int) -> str:
    """The common prefix of the data files rank ``rank`` writes in save ``save_id``."""
    return f"data-{save_id}-{rank}"


def data_file_name(prefix: str, n: int) -> str:
    """The ``n``-th data file under ``prefix`` (one per writer thread)."""
    return f"{prefix}-{n}.bin"


def is_data_file(name: str) -> bool:
    """Whether ``name`` is a data file of the layout (``data-*.bin``, as a manifest may name
    one); :func:`save_id_of` tells the ones torchstow itself names."""
    return name.startswith("data-") and name.endswith(".bin")


# a save's data files (data-<id>-<rank>-<n>.bin) and a copy's (data-<id>-<n>.bin); ids are 12
# hex digits: other data-*.bin names are no file torchstow wrote (a user's data-train-0.bin)
_WRITTEN_DATA = re.compile(r"^data-([0-9a-f]{12})(?:-\d+)?-\d+\.bin$")


def save_id_of(name: str) -> str | None:
    """The id of the save (or copy) that wrote the data file ``name``, as torchstow names
    its data files; None for any other name."""
    found = _WRITTEN_DATA.match(name)
    return found.group(1) if found else None


def temporary_name(name: str, token: str) -> str:
    """The name ``name`` is written under before it is atomically renamed into place."""
    return f".{name}.{token}.tmp"


def is_temporary(name: str, of: str = MANIFEST) -> bool:
    """Whether ``name`` is a temporary file of ``of`` (see :func:`temporary_name`)."""
    return name.startswith(f".{of}.") and name.endswith(".tmp")


def chunk_table_name(save_id: str) -> str:
    """The name of the chunk table a version-2 manifest with ``save_id`` names (one per
    commit: saves racing to one location, or replacing each other, never share one)."""
    return f"manifest-{save_id}.chunks"


def is_chunk_table(name: str) -> bool:
    """Whether ``name`` is a version-2 manifest's chunk table: ``manifest-*.chunks``,
    a plain name (no path separator, no NUL, at most 255 characters)."""
    return (
        name.startswith("manifest-")
        and name.endswith(".chunks")
        and len(name) <= 255
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def is_manifest_file(name: str) -> bool:
    """Whether ``name`` is part of the manifest (the manifest, or a version-2 manifest's
    chunk table): what a wrapper that transforms data files (encryption) leaves plain, so
    that the verbs reading manifests only (``ls``, ``info``) need none of its data options."""
    return name == MANIFEST or is_chunk_table(name)


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is a file torchstow writes into a checkpoint besides its manifest:
    data named as a save or copy names it (:func:`save_id_of`), a chunk table or publish
    debris (of the manifest or of a chunk table). A user's ``data-notes.bin`` is not one."""
    return (
        save_id_of(name) is not None
        or is_chunk_table(name)
        or is_temporary(name)
        or (name.startswith(".manifest-") and ".chunks." in name and name.endswith(".tmp"))
    )
