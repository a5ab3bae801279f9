"""How a checkpoint writer process builds its writer, and the two ways to say so.

The child process calls a *writer factory* with its rank info:
:class:`DefaultWriterFactory` builds a :class:`CheckpointWriter` with a barrier
from configs, :class:`CustomWriterFactory` calls a user's init function the
way PyTorch's ``CheckpointProcess`` does. :func:`process_args` reads either
form of ``CheckpointProcess``'s constructor arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torchstow.checkpointing.barriers import BarrierConfig, create_barrier_from_config
from torchstow.checkpointing.checkpoint_io import CheckpointWriter, CheckpointWriterConfig, WriterHook
from torchstow.checkpointing.opener import StorageOpener
from torchstow.checkpointing.rank_info import RankInfo

__all__ = ["CustomWriterFactory", "DefaultWriterFactory", "WriterFactory", "process_args"]


@dataclass
class DefaultWriterFactory:
    """Builds the child's :class:`CheckpointWriter` (with its barrier) inside the child."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    commit_hook: WriterHook | None = None
    opener: StorageOpener | None = None

    def __call__(self, rank_info: RankInfo) -> CheckpointWriter:
        barrier = create_barrier_from_config(
            self.barrier_config, rank_info, timeout_secs=self.writer_config.write_barrier_timeout_secs
        )
        return CheckpointWriter(self.writer_config, rank_info, barrier, self.commit_hook, opener=self.opener)


WriterFactory = Callable[[RankInfo], CheckpointWriter]


@dataclass
class CustomWriterFactory:
    """Calls a writer init function in the child: PyTorch's ``checkpoint_writer_init_fn(**init_args)``,
    with ``rank_info`` added to the arguments only when they do not hold it already."""

    init_fn: Callable[..., CheckpointWriter]
    init_args: dict[str, Any] = field(default_factory=dict)

    def __call__(self, rank_info: RankInfo) -> CheckpointWriter:
        args = dict(self.init_args)
        args.setdefault("rank_info", rank_info)
        return self.init_fn(**args)


def _pytorch_form(
    subprocess_init_fn: Callable[..., Any] | None = None,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None = None,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
) -> None:
    """PyTorch's arguments after ``rank_info`` and ``config``."""


def _torchstow_form(
    writer_factory: WriterFactory,
    *,
    subprocess_init_fn: Callable[..., Any] | None = None,
    subprocess_init_args: tuple[Any, ...] = (),
) -> None:
    """torchstow's arguments after ``rank_info`` and ``config``."""


def process_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[WriterFactory, Any, tuple[Any, ...]]:
    """``(writer_factory, subprocess_init_fn, subprocess_init_args)`` from either constructor form."""
    if len(args) > 1 or "checkpoint_writer_init_fn" in kwargs or "checkpoint_writer_init_args" in kwargs:
        bound = inspect.signature(_pytorch_form).bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        init_fn = given["checkpoint_writer_init_fn"]
        factory: WriterFactory = (
            DefaultWriterFactory()
            if init_fn is None
            else CustomWriterFactory(init_fn, dict(given["checkpoint_writer_init_args"] or {}))
        )
        return factory, given["subprocess_init_fn"], tuple(given["subprocess_init_args"] or ())
    bound = inspect.signature(_torchstow_form).bind(*args, **kwargs)
    bound.apply_defaults()
    given = bound.arguments
    return given["writer_factory"], given["subprocess_init_fn"], tuple(given["subprocess_init_args"] or ())
