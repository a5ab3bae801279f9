"""Interoperability: DCP (its calls, its storage protocol, its format), and ``convert``
between torchstow, DCP, ``torch.save`` and Hugging Face safetensors (convert.py, sources.py,
targets.py).

The modules that subclass DCP's classes import ``torch.distributed.checkpoint``
(a heavy import), so the entry points here load them on first use.
"""

from __future__ import annotations

import os
from typing import Any

from torchstow.api import storage_reader, storage_writer

__all__ = ["dcp_storage_reader", "dcp_storage_writer"]


def dcp_storage_writer(
    uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None, overwrite: bool = False
) -> Any:
    """A ``torch.distributed.checkpoint.StorageWriter`` that saves a torchstow
    checkpoint at ``uri`` through the backend its scheme names (plugins included).

    For ``dcp.save(state_dict, storage_writer=torchstow.dcp_storage_writer(uri))``
    and ``dcp.async_save``. ``overwrite`` and ``storage_options`` are as in
    :func:`torchstow.save`.
    """
    from torchstow.interop.dcp_storage import DcpStorageWriter

    text = os.fspath(uri)
    return DcpStorageWriter(storage_writer(text, storage_options=storage_options, overwrite=overwrite), text)


def dcp_storage_reader(
    uri: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None, allow_pickle: bool = False
) -> Any:
    """A ``torch.distributed.checkpoint.StorageReader`` that loads the checkpoint
    at ``uri`` (torchstow's format, or DCP's own) through torchstow's backends.

    For ``dcp.load(state_dict, storage_reader=torchstow.dcp_storage_reader(uri))``.
    Objects are handed to DCP's planner only once the restricted loader
    read them; those saved with full pickle need ``allow_pickle=True``.
    """
    from torchstow.interop.dcp_storage import DcpStorageReader

    text = os.fspath(uri)
    return DcpStorageReader(
        storage_reader(text, storage_options=storage_options), text, allow_pickle=allow_pickle
    )
