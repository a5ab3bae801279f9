"""``prune``: retention for a directory or prefix of checkpoints."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from typing import Any, Protocol

from torchstow.core.storage.backend import Backend
from torchstow.errors import CheckpointNotFoundError
from torchstow.format.manifest import CheckpointInfo
from torchstow.management.catalog import delete, list_checkpoints
from torchstow.management.listing import is_link
from torchstow.management.steps import is_step_uri
from torchstow.management.verify import ProgressCallback
from torchstow.plugins.resolve import backend_at

__all__ = ["Keeping", "counted", "plan_prune", "prune", "prune_after_commit", "prune_keeping", "prune_listed"]

logger = logging.getLogger(__name__)


def plan_prune(
    found: list[CheckpointInfo],
    *,
    keep_last: int,
    keep_every: int | None = None,
    keep_steps: Collection[int] = (),
) -> list[CheckpointInfo]:
    """Which of ``found`` (committed checkpoints, oldest first) a prune deletes, oldest first.

    Kept: the newest ``keep_last``, every one whose step is a multiple of
    ``keep_every`` or in ``keep_steps``, and always the newest.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be a non-negative integer, got {keep_last!r}")
    if keep_every is not None and (
        isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1
    ):
        raise ValueError(f"keep_every must be a positive integer, got {keep_every!r}")
    if not found:
        return []
    kept = {id(info) for info in found[-max(keep_last, 1) :]}
    if keep_every is not None:
        kept.update(id(i) for i in found if i.step is not None and i.step % keep_every == 0)
    kept.update(id(i) for i in found if i.step in keep_steps)
    return [info for info in found if id(info) not in kept]


def prune(
    uri: str | os.PathLike[str],
    *,
    keep_last: int,
    keep_every: int | None = None,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> list[str]:
    """Delete older committed checkpoints directly under ``uri`` (a directory or prefix).

    Counts the checkpoints that have a step (the ``step`` of their user metadata,
    else the one their name ends in: :func:`~torchstow.management.steps.step_of`,
    as :func:`torchstow.latest` reads it) and keeps the newest ``keep_last`` of
    them (ordered by step, then commit time), every one whose step is a multiple
    of ``keep_every``, and always the newest (checkpoints in DCP's own format
    count too, and go as :func:`torchstow.delete` removes them). Checkpoints
    with no step (``best``, ``final`` saved without one) are neither counted nor
    deleted; nor are symbolic links (never deleted through), incomplete
    checkpoints and other entries. Deletes oldest first, each manifest first, so an interrupted
    prune leaves only whole checkpoints; one already gone when its turn comes (another
    prune, a manager's retention) is no error. Returns the URIs deleted (or, with
    ``dry_run``, that would be).
    ``progress(1, number_to_delete)`` is called after each deletion.
    """
    committed = list_checkpoints(uri, storage_options=storage_options)
    return prune_listed(
        uri,
        committed,
        keep_last=keep_last,
        keep_every=keep_every,
        dry_run=dry_run,
        storage_options=storage_options,
        progress=progress,
    )


def prune_keeping(
    uri: str,
    step: int,
    *,
    keep_last: int,
    keep_every: int | None,
    storage_options: dict[str, Any] | None,
) -> list[str]:
    """:func:`prune` after a manager committed ``step``, which it never deletes, even where
    newer steps would push it out (a manager refuses to save below them; this is the net).
    Only the manager's own steps (``<uri>/step-<n>``, :func:`~torchstow.management.steps.is_step_uri`)
    are counted and deleted: other checkpoints under ``uri`` (a user's ``best``, a DCP
    export, ``iter_0000007``) are none of its business."""
    committed = list_checkpoints(uri, storage_options=storage_options)
    return prune_listed(
        uri,
        committed,
        keep_last=keep_last,
        keep_every=keep_every,
        keep_steps=(step,),
        storage_options=storage_options,
        managed=True,
    )


class Keeping(Protocol):
    """A manager as its pruning sees it: the root of its steps and what it keeps there."""

    root: str
    keep_last: int | None
    keep_every: int | None
    storage_options: dict[str, Any] | None


def prune_after_commit(manager: Keeping, step: int) -> None:
    """On ``manager``'s coordinator after ``step`` committed under its root: :func:`prune_keeping`
    where ``keep_last`` or ``keep_every`` is set. A failure is a warning, never raised: the
    step is committed all the same, and every rank goes on alike (raised on the coordinator
    alone, the others would wait for it in their next save)."""
    if manager.keep_last is None and manager.keep_every is None:
        return
    try:
        prune_keeping(
            manager.root,
            step,
            keep_last=manager.keep_last or 0,
            keep_every=manager.keep_every,
            storage_options=manager.storage_options,
        )
    except Exception as exc:
        logger.warning("pruning %s after committing step %d failed: %s", manager.root, step, exc)


def counted(backend: Backend, info: CheckpointInfo, *, managed: bool = False) -> bool:
    """Whether a prune counts (and may delete) the committed checkpoint ``info``: one with a
    step (a manager's: named ``step-<n>`` for its step ``n``), and no symbolic link
    (latest -> step-300: deleting it would delete the checkpoint it points at)."""
    if is_link(backend, info.uri):
        return False
    return is_step_uri(info.uri, info.step) if managed else info.step is not None


def prune_listed(
    uri: str | os.PathLike[str],
    committed: list[CheckpointInfo],
    *,
    keep_last: int,
    keep_every: int | None = None,
    keep_steps: Collection[int] = (),
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    managed: bool = False,
) -> list[str]:
    """:func:`prune` of ``committed``, the committed checkpoints under ``uri`` as the caller
    listed them (oldest first, as :func:`list_checkpoints` orders them), so that what it
    reports and what is deleted come from one listing (``torchstow prune``); ``keep_steps``
    are kept too, and with ``managed`` only a manager's own steps count (:func:`counted`)."""
    backend = backend_at(uri, storage_options)[1]
    found = [info for info in committed if counted(backend, info, managed=managed)]
    doomed = plan_prune(
        found,
        keep_last=keep_last,
        keep_every=keep_every,
        keep_steps=keep_steps,
    )
    if not dry_run:
        for info in doomed:
            logger.info("pruning %s", info.uri)
            # A committed step older than those kept goes whole, debris of a later failed
            # overwrite there included (the in-flight check is for a location being saved to).
            with contextlib.suppress(CheckpointNotFoundError):  # already gone: another prune's
                delete(info.uri, storage_options=storage_options, force=True)
            if progress is not None:
                progress(1, len(doomed))
    return [info.uri for info in doomed]
