"""DCP's planners behind torchstow's planner interface.

:class:`DcpSavePlannerAdapter` and :class:`DcpLoadPlannerAdapter` let a
``torch.distributed.checkpoint`` planner (its defaults or a subclass) plan a
torchstow save or load: each call is forwarded with the plans, items and
metadata translated. The storage adapters of :mod:`torchstow.interop.dcp_storage`
use the same classes to hand DCP's planner to torchstow's storage.

Objects DCP serialises come as ``torch.save`` bytes. They are stored as
opaque bytes marked by what it takes to read them back: ``torch`` when the
restricted loader (``torch.load(weights_only=True)``) reads them, ``pickle``
otherwise (refused on load unless ``allow_pickle``).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import WriteItemType

from torchstow.compat import dcp_types as conv
from torchstow.core import planning as ts_plan
from torchstow.errors import CorruptCheckpointError, PickleNotAllowedError
from torchstow.format.dcp_metadata import object_encoding
from torchstow.format.leaves import JSON, PICKLE, TORCH, check_unpickling_allowed
from torchstow.format.manifest import BytesStorageMetadata, Metadata

__all__ = [
    "DcpLoadPlannerAdapter",
    "DcpSavePlannerAdapter",
    "check_payload",
    "classify_payload",
    "is_dcp_load_planner",
    "is_dcp_save_planner",
]


def is_dcp_save_planner(planner: Any) -> bool:
    """Whether ``planner`` is a ``torch.distributed.checkpoint.SavePlanner``."""
    return isinstance(planner, dcp.SavePlanner)


def is_dcp_load_planner(planner: Any) -> bool:
    """Whether ``planner`` is a ``torch.distributed.checkpoint.LoadPlanner``."""
    return isinstance(planner, dcp.LoadPlanner)


def _restricted_load(payload: bytes) -> Any:
    return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")


def classify_payload(fqn: str, payload: bytes, *, allow_pickle: bool) -> str:
    """The encoding of ``torch.save`` bytes: ``torch`` when the restricted loader
    reads them, else ``pickle`` (PickleNotAllowedError unless ``allow_pickle``)."""
    try:
        _restricted_load(payload)
    except Exception as exc:
        if not allow_pickle:
            raise PickleNotAllowedError(
                f"{fqn}: the object can only be stored with full pickle, which runs arbitrary code on "
                "load; pass allow_pickle=True to save (and to load) it"
            ) from exc
        return PICKLE
    return TORCH


def check_payload(fqn: str, encoding: str, payload: bytes, *, allow_pickle: bool) -> None:
    """Refuse bytes that DCP's planner would unpickle unless they are safe to.

    ``pickle`` bytes need ``allow_pickle``; ``torch`` bytes must pass the
    restricted loader (so a tampered payload is never executed).
    """
    check_unpickling_allowed(fqn, encoding, allow_pickle=allow_pickle)
    if encoding == PICKLE:
        return
    try:
        _restricted_load(payload)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{fqn}: the stored object is not readable with the restricted loader "
            f"(torch.load(weights_only=True)): {exc}"
        ) from exc


class DcpSavePlannerAdapter(ts_plan.SavePlanner):
    """A torchstow SavePlanner that forwards to the DCP SavePlanner ``planner``."""

    def __init__(self, planner: Any, *, allow_pickle: bool = False) -> None:
        self.planner = planner
        self.allow_pickle = allow_pickle
        self.encodings: dict[str, str] = {}
        self._payloads: dict[str, bytes] = {}
        self._dcp_items: dict[Any, Any] = {}

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        self.planner.set_up_planner(
            state_dict=state_dict, storage_meta=storage_meta, is_coordinator=is_coordinator
        )

    def _payload(self, item: Any) -> bytes:
        data = self.planner.resolve_data(item)
        return data.getvalue() if isinstance(data, io.BytesIO) else bytes(data.read())

    def create_local_plan(self) -> ts_plan.SavePlan:
        plan = self.planner.create_local_plan()
        items = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                fqn = item.index.fqn
                payload = self._payloads[fqn] = self._payload(item)
                encoding = self.encodings[fqn] = classify_payload(
                    fqn, payload, allow_pickle=self.allow_pickle
                )
                items.append(conv.ts_write_item(item, encoding))
            else:
                items.append(conv.ts_write_item(item))
        return ts_plan.SavePlan(items, plan.storage_data, plan.planner_data)

    def create_global_plan(
        self, all_plans: list[ts_plan.SavePlan]
    ) -> tuple[list[ts_plan.SavePlan], Metadata]:
        encodings = {
            item.index.fqn: item.bytes_data.encoding
            for plan in all_plans
            for item in plan.items
            if item.bytes_data is not None
        }
        dcp_plans = [
            dcp.SavePlan([conv.dcp_write_item(i) for i in p.items], p.storage_data, p.planner_data)
            for p in all_plans
        ]
        new_plans, md = self.planner.create_global_plan(dcp_plans)
        entries = conv.ts_metadata_entries(md.state_dict_metadata, encodings)
        metadata = Metadata(
            state_dict_metadata=entries,
            planner_data=conv.planner_data_from_mappings(md.planner_data, entries),
        )
        return [self._ts_plan(p, encodings) for p in new_plans], metadata

    @staticmethod
    def _ts_plan(plan: Any, encodings: dict[str, str]) -> ts_plan.SavePlan:
        items = [conv.ts_write_item(i, encodings.get(i.index.fqn, TORCH)) for i in plan.items]
        return ts_plan.SavePlan(items, plan.storage_data, plan.planner_data)

    def finish_plan(self, new_plan: ts_plan.SavePlan) -> ts_plan.SavePlan:
        dcp_plan = dcp.SavePlan(
            [conv.dcp_write_item(i) for i in new_plan.items], new_plan.storage_data, new_plan.planner_data
        )
        final = self.planner.finish_plan(dcp_plan)
        self._dcp_items = {conv.ts_index(i.index): i for i in final.items}
        return self._ts_plan(final, self.encodings)

    def adopt(self, items: list[Any]) -> None:
        """Take DCP's final items for this rank, when DCP made the plan itself."""
        self._dcp_items = {conv.ts_index(i.index): i for i in items}

    def dcp_item(self, item: ts_plan.WriteItem) -> Any:
        """The DCP item ``item`` stands for."""
        found = self._dcp_items.get(item.index)
        return found if found is not None else conv.dcp_write_item(item)

    def resolve_data(self, write_item: ts_plan.WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type != ts_plan.WriteItemType.BYTE_IO:
            return self.planner.resolve_data(self.dcp_item(write_item))
        fqn = write_item.index.fqn
        payload = self._payloads.get(fqn)
        if payload is None:  # planned by DCP itself: classify what it serialised
            payload = self._payload(self.dcp_item(write_item))
            self.encodings[fqn] = classify_payload(fqn, payload, allow_pickle=True)
        return io.BytesIO(payload)


class DcpLoadPlannerAdapter(ts_plan.LoadPlanner):
    """A torchstow LoadPlanner that forwards to the DCP LoadPlanner ``planner``.

    ``metadata`` is the torchstow manifest, when DCP set ``planner`` up itself.
    Objects go to the DCP planner only after :func:`check_payload` passed;
    values the manifest holds inline (JSON) are handed over without a read.
    """

    def __init__(self, planner: Any, *, metadata: Metadata | None = None, allow_pickle: bool = False) -> None:
        self.planner = planner
        self.allow_pickle = allow_pickle
        if metadata is not None:
            self.metadata = metadata

    def set_up_planner(self, state_dict: Any, metadata: Metadata, is_coordinator: bool = False) -> None:
        self.metadata = metadata
        self.planner.set_up_planner(state_dict, conv.dcp_metadata(metadata), is_coordinator)

    def deliver_inline(self, items: list[ts_plan.ReadItem]) -> list[ts_plan.ReadItem]:
        """Hand the DCP planner every inline (JSON) value among ``items``; the items left to read."""
        left = []
        for item in items:
            entry = self.metadata.state_dict_metadata.get(item.storage_index.fqn)
            inline = isinstance(entry, BytesStorageMetadata) and entry.encoding == JSON
            if item.type == ts_plan.LoadItemType.BYTE_IO and inline:
                assert isinstance(entry, BytesStorageMetadata)
                buf = io.BytesIO()
                torch.save(entry.value, buf)
                buf.seek(0)
                self.planner.load_bytes(conv.dcp_read_item(item), buf)
                continue
            left.append(item)
        return left

    def create_local_plan(self) -> ts_plan.LoadPlan:
        plan = conv.ts_load_plan(self.planner.create_local_plan())
        plan.items = self.deliver_inline(plan.items)
        return plan

    def create_global_plan(self, global_plan: list[ts_plan.LoadPlan]) -> list[ts_plan.LoadPlan]:
        plans = self.planner.create_global_plan([conv.dcp_load_plan(p) for p in global_plan])
        return [conv.ts_load_plan(p) for p in plans]

    def finish_plan(self, central_plan: ts_plan.LoadPlan) -> ts_plan.LoadPlan:
        return conv.ts_load_plan(self.planner.finish_plan(conv.dcp_load_plan(central_plan)))

    def load_bytes(self, read_item: ts_plan.ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.storage_index.fqn
        entry = self.metadata.state_dict_metadata[fqn]
        assert isinstance(entry, BytesStorageMetadata)
        payload = value.getvalue()
        encoding = object_encoding(self.metadata, entry.encoding, allow_pickle=self.allow_pickle)
        check_payload(fqn, encoding, payload, allow_pickle=self.allow_pickle)
        self.planner.load_bytes(conv.dcp_read_item(read_item), io.BytesIO(payload))

    def resolve_tensor(self, read_item: ts_plan.ReadItem) -> torch.Tensor:
        return self.planner.resolve_tensor(conv.dcp_read_item(read_item))

    def commit_tensor(self, read_item: ts_plan.ReadItem, tensor: torch.Tensor) -> None:
        self.planner.commit_tensor(conv.dcp_read_item(read_item), tensor)
