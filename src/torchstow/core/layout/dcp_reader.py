"""Reading the items of a checkpoint in DCP's own format (``.distcp`` files), for the
layout reader when the manifest it read was a DCP ``.metadata``
(:class:`~torchstow.format.dcp_metadata.DcpLocations`).

Each tensor chunk is a ``torch.save`` blob, read back with
``torch.load(weights_only=True)``; objects stay opaque bytes for the planner's
restricted loader. DCP writes no checksums, so none are verified.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import torch

from torchstow.core.planning import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torchstow.core.storage.store import ByteStore
from torchstow.errors import CorruptCheckpointError
from torchstow.format.chunks import region
from torchstow.format.files import DCP_METADATA
from torchstow.format.manifest import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata
from torchstow.format.validation import missing_file_error

__all__ = ["DcpItems"]


class DcpItems:
    """The items of the DCP-format checkpoint in ``store`` that ``metadata`` describes;
    ``missing`` and ``beyond`` are what the reader found checking its files (listed
    files not present, locations past their file's end with the error to raise)."""

    def __init__(
        self, store: ByteStore, metadata: Metadata, missing: set[str], beyond: Mapping[MetadataIndex, str]
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.locations: dict[MetadataIndex, StorageInfo] = metadata.storage_data
        self.missing = missing
        self.beyond = beyond

    def read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Read every item of ``plan`` into ``planner``, one chunk decoded at a time."""
        cached: tuple[MetadataIndex | None, torch.Tensor | None] = (None, None)
        for item in sorted(plan.items, key=_by_location(self.locations)):
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(self._payload(item.storage_index)))
                continue
            if cached[0] != item.storage_index:
                cached = (item.storage_index, self._chunk(item))
            assert cached[1] is not None
            source = region(cached[1], item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item)
            with torch.no_grad():
                target.copy_(source)
            planner.commit_tensor(item, target)

    def _payload(self, index: MetadataIndex) -> bytes:
        info = self.locations.get(index)
        if info is None:
            raise CorruptCheckpointError(
                f"{self.store.location}/{DCP_METADATA} has no data location for {index}"
            )
        if info.relative_path in self.missing:
            raise missing_file_error(self.store.location, info.relative_path, index.fqn)
        if index in self.beyond:
            raise CorruptCheckpointError(self.beyond[index])
        buf = bytearray(info.length)
        try:
            self.store.read_into(info.relative_path, [(info.offset, memoryview(buf))])
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{self.store.location}/{info.relative_path} is missing, though {DCP_METADATA} lists it"
            ) from exc
        return bytes(buf)

    def _chunk(self, item: ReadItem) -> torch.Tensor:
        index = item.storage_index
        try:
            tensor = torch.load(io.BytesIO(self._payload(index)), weights_only=True, map_location="cpu")
        except CorruptCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{self.store.location}: the data of {index} does not load: {exc}"
            ) from exc
        entry = self.metadata.state_dict_metadata[index.fqn]
        assert isinstance(entry, TensorStorageMetadata)
        sizes = next((c.sizes for c in entry.chunks if c.offsets == index.offset), None)
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.shape != sizes
            or tensor.dtype != entry.properties.dtype
        ):
            raise CorruptCheckpointError(
                f"{self.store.location}: the data of {index} is not the {entry.properties.dtype} chunk "
                f"of shape {list(sizes or [])} the metadata describes"
            )
        return tensor


def _by_location(locations: dict[MetadataIndex, StorageInfo]) -> Callable[[ReadItem], tuple[str, int]]:
    def key(item: ReadItem) -> tuple[str, int]:
        info = locations.get(item.storage_index)
        return ("", -1) if info is None else (info.relative_path, info.offset)

    return key
