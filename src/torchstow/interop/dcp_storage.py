"""torchstow's backends under ``dcp.save``/``dcp.load``/``dcp.async_save``.

:class:`DcpStorageWriter` and :class:`DcpStorageReader` are real
``torch.distributed.checkpoint`` storage classes wrapped around a torchstow
writer or reader (any backend, plugins included). DCP plans and serialises;
torchstow stores: what commits is an ordinary torchstow checkpoint (a JSON
manifest published last and atomically, crc32c per block), readable by
``torchstow.load``/``read`` and, through :class:`DcpStorageReader`, by ``dcp.load``.
Use :func:`torchstow.dcp_storage_writer`/:func:`torchstow.dcp_storage_reader` to make them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata as DcpMetadata
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.storage import WriteResult as DcpWriteResult

from torchstow.compat import dcp_types as conv
from torchstow.compat.dcp_planners import DcpLoadPlannerAdapter, DcpSavePlannerAdapter
from torchstow.core import planning as ts_plan
from torchstow.core.accepted_kwargs import call_with_accepted
from torchstow.core.futures import wait_future
from torchstow.core.storage.interfaces import StorageReader, StorageWriter, WriteResult
from torchstow.errors import CorruptCheckpointError
from torchstow.format.manifest import Metadata

__all__ = ["DcpStorageReader", "DcpStorageWriter"]


@dataclass(frozen=True)
class _Stored:
    """What a write result carries back to the coordinator: the torchstow
    storage data, and for a serialised object how it reads back."""

    storage_data: Any
    encoding: str | None = None


def _done(value: Any) -> torch.futures.Future[Any]:
    future: torch.futures.Future[Any] = torch.futures.Future()
    future.set_result(value)
    return future


class _ByUri:
    """What the DCP writer and reader here share: the URI that names their
    checkpoint (DCP's ``checkpoint_id``), and ``reset`` passed on to the
    torchstow storage inside. Any checkpoint id is accepted: backends decide."""

    uri: str

    def _storage(self) -> StorageWriter | StorageReader:
        raise NotImplementedError

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint written or read."""
        return self.uri

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.uri = os.fspath(checkpoint_id)
        self._storage().reset(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True


class DcpStorageWriter(_ByUri, dcp.StorageWriter):
    """A DCP ``StorageWriter`` that stores through the torchstow writer ``torchstow_writer``."""

    def __init__(self, torchstow_writer: StorageWriter, uri: str) -> None:
        super().__init__()
        self.torchstow_writer = torchstow_writer
        self.uri = uri

    def _storage(self) -> StorageWriter:
        return self.torchstow_writer

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.uri, save_id=uuid.uuid4().hex)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        passed = {k: v for k, v in kwargs.items() if k in ("rank", "world_size")}
        call_with_accepted(self.torchstow_writer.set_up_storage_writer, is_coordinator, *args, **passed)

    def prepare_local_plan(self, plan: dcp.SavePlan) -> dcp.SavePlan:
        ours = self.torchstow_writer.prepare_local_plan(self._ts_plan(plan))
        return replace(plan, storage_data=ours.storage_data)

    def prepare_global_plan(self, plans: list[dcp.SavePlan]) -> list[dcp.SavePlan]:
        ours = self.torchstow_writer.prepare_global_plan([self._ts_plan(p) for p in plans])
        return [replace(p, storage_data=o.storage_data) for p, o in zip(plans, ours, strict=True)]

    @staticmethod
    def _ts_plan(plan: dcp.SavePlan) -> ts_plan.SavePlan:
        items = [conv.ts_write_item(item) for item in plan.items]
        return ts_plan.SavePlan(items, plan.storage_data)

    def write_data(self, plan: dcp.SavePlan, planner: dcp.SavePlanner) -> torch.futures.Future[Any]:
        adapter = DcpSavePlannerAdapter(planner, allow_pickle=True)
        adapter.adopt(plan.items)
        results = wait_future(self.torchstow_writer.write_data(self._ts_plan(plan), adapter))
        return _done(
            [
                DcpWriteResult(
                    index=conv.dcp_index(r.index),
                    size_in_bytes=r.size_in_bytes,
                    storage_data=_Stored(r.storage_data, adapter.encodings.get(r.index.fqn)),
                )
                for r in results
            ]
        )

    def finish(self, metadata: DcpMetadata, results: list[list[DcpWriteResult]]) -> None:
        encodings = {
            r.index.fqn: r.storage_data.encoding for rs in results for r in rs if r.storage_data.encoding
        }
        entries = conv.ts_metadata_entries(metadata.state_dict_metadata, encodings)
        manifest = Metadata(
            state_dict_metadata=entries,
            planner_data=conv.planner_data_from_mappings(metadata.planner_data, entries),
        )
        ours = [
            [WriteResult(conv.ts_index(r.index), r.size_in_bytes, r.storage_data.storage_data) for r in rs]
            for rs in results
        ]
        self.torchstow_writer.finish(manifest, ours)


class DcpStorageReader(_ByUri, dcp.StorageReader):
    """A DCP ``StorageReader`` that loads through the torchstow reader ``torchstow_reader``.

    Objects reach DCP's planner only once the restricted loader has read
    them; objects saved with full pickle need ``allow_pickle``.
    """

    def __init__(self, torchstow_reader: StorageReader, uri: str, *, allow_pickle: bool = False) -> None:
        super().__init__()
        self.torchstow_reader = torchstow_reader
        self.uri = uri
        self.allow_pickle = allow_pickle
        self.manifest: Metadata | None = None

    def _storage(self) -> StorageReader:
        return self.torchstow_reader

    def read_metadata(self, *args: Any, **kwargs: Any) -> DcpMetadata:
        return conv.dcp_metadata(self.torchstow_reader.read_metadata())

    def set_up_storage_reader(
        self, metadata: DcpMetadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        manifest = metadata.storage_data
        if not isinstance(manifest, Metadata):
            raise CorruptCheckpointError(
                f"the metadata given for {self.uri} was not read by a torchstow DCP reader"
            )
        self.manifest = manifest
        passed = {k: v for k, v in kwargs.items() if k in ("rank", "world_size")}
        call_with_accepted(
            self.torchstow_reader.set_up_storage_reader, manifest, is_coordinator, *args, **passed
        )

    def prepare_local_plan(self, plan: dcp.LoadPlan) -> dcp.LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[dcp.LoadPlan]) -> list[dcp.LoadPlan]:
        return plans

    def read_data(self, plan: dcp.LoadPlan, planner: dcp.LoadPlanner) -> torch.futures.Future[None]:
        assert self.manifest is not None, "set_up_storage_reader was not called"
        adapter = DcpLoadPlannerAdapter(planner, metadata=self.manifest, allow_pickle=self.allow_pickle)
        ours = conv.ts_load_plan(plan)
        ours.items = adapter.deliver_inline(ours.items)
        wait_future(self.torchstow_reader.read_data(ours, adapter))
        return _done(None)
