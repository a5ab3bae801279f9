"""Checkpointers: save and load this rank's state, synchronously or in the background.

:class:`SyncCheckpointer` writes in the caller's thread. :class:`AsyncCheckpointer`
stages into shared memory, then a long-lived writer process
(:mod:`torchstow.checkpointing.writer_process`) writes from there: ``save`` returns a
staging future and a write future. Both load synchronously. The builders
make either from one :class:`CheckpointerConfig`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

from torchstow.checkpointing.barriers import BarrierConfig, create_barrier_from_config
from torchstow.checkpointing.checkpoint_io import (
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    MapLocation,
    WriterHook,
)
from torchstow.checkpointing.rank_info import RankInfo, default_rank_info
from torchstow.checkpointing.writer_factories import CustomWriterFactory, DefaultWriterFactory
from torchstow.checkpointing.writer_process import CheckpointProcess, CheckpointProcessConfig
from torchstow.core.futures import as_future, failed_future
from torchstow.core.staging.stager import CheckpointStagerConfig, DefaultStager

__all__ = [
    "AsyncCheckpointer",
    "Checkpointer",
    "CheckpointerConfig",
    "SyncCheckpointer",
    "make_async_checkpointer",
    "make_sync_checkpointer",
]

logger = logging.getLogger(__name__)


@dataclass
class CheckpointerConfig:
    """Everything the builders need: writer, barrier, staging and writer-process settings."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)


class Checkpointer(abc.ABC):
    """Saves this rank's state dicts, with every other rank's, as one checkpoint at a path; loads them."""

    def __init__(self, reader: CheckpointReader) -> None:
        self._reader = reader

    @abc.abstractmethod
    def save(self, path: str, state_dict: Mapping[str, Any], **kwargs: Any) -> Any:
        """Save ``state_dict`` under ``path``; ``kwargs`` reach the commit hooks."""

    def load(
        self,
        path: str,
        state_dict: Mapping[str, Any] | None = None,
        *,
        default_map_location: MapLocation = None,
        strict: bool = False,
    ) -> dict[str, Any]:
        """This rank's state dict from ``path`` (see :meth:`CheckpointReader.read`), synchronously."""
        loaded, _ = self._reader.read(path, state_dict, map_location=default_map_location, strict=strict)
        return loaded

    @abc.abstractmethod
    def close(self) -> None:
        """Release threads, processes and memory."""

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCheckpointer(Checkpointer):
    """Writes in the caller's thread with ``writer``, reads with ``reader``."""

    def __init__(self, writer: CheckpointWriter, reader: CheckpointReader) -> None:
        super().__init__(reader)
        self._writer = writer

    def save(self, path: str, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        """Write ``state_dict``, this rank's part of the checkpoint at ``path``; returns once committed."""
        self._writer.write(path, state_dict, **kwargs)

    def close(self) -> None:
        self._writer.close()


class AsyncCheckpointer(Checkpointer):
    """Stages with ``checkpoint_stager`` (into shared memory) and writes in ``checkpoint_process``.

    ``save`` returns ``(staging_future, write_future)``: mutate the state
    dict only once the first is done; the second completes when the
    checkpoint at ``path`` is committed, or raises the write's error. A save first waits
    for the previous one to finish writing (its buffers are about to be
    reused), without raising the previous one's error: a failed write does
    not stop the next. A staging that fails fails both futures (the write
    still goes ahead, failed, so every rank fails it as one). A writer
    process that failed to start or died makes ``save`` raise at once.
    """

    def __init__(
        self,
        checkpoint_stager: DefaultStager,
        checkpoint_process: CheckpointProcess,
        reader: CheckpointReader,
    ) -> None:
        super().__init__(reader)
        self._stager = checkpoint_stager
        self._process = checkpoint_process
        self._write_future: Future[None] | None = None

    @property
    def process(self) -> CheckpointProcess:
        """The writer process."""
        return self._process

    @property
    def stager(self) -> DefaultStager:
        """The stager (its buffers are the shared memory the writer process reads)."""
        return self._stager

    def save(
        self, path: str, state_dict: Mapping[str, Any], **kwargs: Any
    ) -> tuple[Future[None], Future[None]]:
        """Stage ``state_dict`` and queue its write under ``path``; the two futures."""
        self._process.check()
        if self._write_future is not None:
            wait_futures([self._write_future])
            self._process.check()  # the writer may have died during that write
        try:
            staging = as_future(self._stager.stage(state_dict))
        except Exception as exc:  # the write still goes ahead, failed: no other rank waits for this one
            staging = failed_future(exc)
        self._write_future = self._process.write(staging, path, **kwargs)
        return _completion(staging), self._write_future

    def close(self) -> None:
        """Stop the writer process (see :meth:`CheckpointProcess.close`) and free the staging memory."""
        self._process.close()
        self._stager.close()


def _completion(future: Future[Any]) -> Future[None]:
    """A Future of None that completes (or fails) with ``future``."""
    done: Future[None] = Future()

    def relay(source: Future[Any]) -> None:
        error = source.exception()
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(None)

    future.add_done_callback(relay)
    return done


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer` from ``config`` (rank info from the default process group when None)."""
    config = config or CheckpointerConfig()
    rank_info = rank_info or default_rank_info()
    barrier = create_barrier_from_config(
        config.barrier_config, rank_info, timeout_secs=config.writer_config.write_barrier_timeout_secs
    )
    writer = CheckpointWriter(config.writer_config, rank_info, barrier, commit_hook)
    reader = CheckpointReader(rank_info, storage_options=config.writer_config.storage_options)
    return SyncCheckpointer(writer, reader)


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    *,
    commit_hook: WriterHook | None = None,
    subprocess_init_fn: Callable[..., Any] | None = None,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None = None,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer` from ``config``; its writer process starts now.

    The staging config's ``use_shared_memory`` is always on (the writer
    process reads from shared memory). The barrier is built in the writer
    process, so it must be one that needs no process group there (use
    ``"tcp_store"``). ``commit_hook`` runs in the writer process.
    ``checkpoint_writer_init_fn(**checkpoint_writer_init_args)`` (plus
    ``rank_info`` unless those arguments hold it) replaces the default
    writer; ``subprocess_init_fn(*subprocess_init_args)`` runs first in the child. All must be picklable.
    """
    config = config or CheckpointerConfig()
    rank_info = rank_info or default_rank_info()
    staging = dataclasses.replace(config.staging_config, use_shared_memory=True)
    factory: Callable[[RankInfo], CheckpointWriter]
    if checkpoint_writer_init_fn is None:
        factory = DefaultWriterFactory(config.writer_config, config.barrier_config, commit_hook)
    else:
        factory = CustomWriterFactory(checkpoint_writer_init_fn, dict(checkpoint_writer_init_args or {}))
    process = CheckpointProcess(
        rank_info,
        config.process_config,
        factory,
        subprocess_init_fn=subprocess_init_fn,
        subprocess_init_args=subprocess_init_args,
    )
    reader = CheckpointReader(rank_info, storage_options=config.writer_config.storage_options)
    return AsyncCheckpointer(DefaultStager(staging), process, reader)
