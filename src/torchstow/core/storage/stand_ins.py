"""Stand-ins for a rank whose save or load failed before the protocol began (resolving
the URI, preparing, staging): each raises that error at the protocol's first step, where
the other ranks already are, so that every rank fails as one instead of waiting for it."""

from __future__ import annotations

from typing import Any, NoReturn

from torchstow.core.storage.interfaces import StorageReader, StorageWriter

__all__ = ["FailedReader", "FailedWriter"]


class _StandIn:
    """What the two stand-ins share: the error, and every step of the protocol raising it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def fail(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise self.error

    prepare_local_plan = prepare_global_plan = fail

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


class FailedWriter(_StandIn, StorageWriter):
    """A save's stand-in: fails its first step (setting up the writer)."""

    set_up_storage_writer = write_data = finish = _StandIn.fail


class FailedReader(_StandIn, StorageReader):
    """A load's stand-in: fails its first step (reading the manifest, or planning)."""

    read_metadata = set_up_storage_reader = read_data = _StandIn.fail
