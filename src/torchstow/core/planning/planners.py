"""The planner interfaces: what a save or load planner does, and in which order it is called."""

from __future__ import annotations

import abc
import io
from collections.abc import Mapping
from typing import Any

import torch

from torchstow.core.planning.items import LoadPlan, ReadItem, SavePlan, WriteItem
from torchstow.format.manifest import Metadata

__all__ = ["LoadPlanner", "SavePlanner"]


class SavePlanner(abc.ABC):
    """Turns a state dict into write items, on every rank and on the coordinator.

    Call order in a save: ``set_up_planner``, ``create_local_plan`` (every
    rank), ``create_global_plan`` (coordinator), ``finish_plan`` (every rank),
    then ``resolve_data`` for each item while the storage writes.
    """

    @abc.abstractmethod
    def set_up_planner(
        self, state_dict: Mapping[str, Any], storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        """Take the state dict this rank saves."""

    @abc.abstractmethod
    def create_local_plan(self) -> SavePlan:
        """The items this rank would write."""

    @abc.abstractmethod
    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """On the coordinator: final plans for every rank and the checkpoint's metadata."""

    @abc.abstractmethod
    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        """Accept the coordinator's plan for this rank."""

    @abc.abstractmethod
    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """The tensor (chunk) or serialized bytes for ``write_item``."""


class LoadPlanner(abc.ABC):
    """Turns a manifest and a state dict into read items, and receives the data.

    Call order in a load: ``set_up_planner``, ``create_local_plan``,
    ``create_global_plan`` (coordinator), ``finish_plan``, then per item
    ``load_bytes`` or ``resolve_tensor`` + ``commit_tensor``.
    """

    @abc.abstractmethod
    def set_up_planner(
        self, state_dict: Mapping[str, Any], metadata: Metadata, is_coordinator: bool = False
    ) -> None:
        """Take the state dict to fill and the checkpoint's metadata."""

    @abc.abstractmethod
    def create_local_plan(self) -> LoadPlan:
        """The items this rank needs."""

    @abc.abstractmethod
    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: adjust every rank's plan."""

    @abc.abstractmethod
    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        """Accept the coordinator's plan for this rank."""

    @abc.abstractmethod
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Receive the serialized bytes of a non-tensor leaf."""

    @abc.abstractmethod
    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The tensor (a view of the destination) that ``read_item`` fills."""

    @abc.abstractmethod
    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Called once ``tensor`` (from :meth:`resolve_tensor`) holds the data."""
