"""What an asynchronous save stages through: the :class:`Stager` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Stager"]


class Stager(Protocol):
    """Makes a copy of a state dict that a background save can write while training goes on.

    :class:`DefaultStager`, :class:`StateDictStager` and
    :class:`ReplicationStager` are stagers; so is any object with these methods.
    """

    def stage(self, state_dict: Mapping[str, Any], /) -> Any:
        """The staged copy, or a ``concurrent.futures.Future`` of it."""

    def close(self) -> None:
        """Free what the stager holds."""
