"""The base of a managed incremental save: one rule for ``CheckpointManager(incremental=True)``
and the tiered manager's incremental persist.

The base of step ``s`` is the newest committed, intact torchstow checkpoint of a step
before ``s`` under the root (a step the manager just committed, when it names one, is
tried first: while it is intact nothing is listed). A newer step there belongs to a
timeline the run left by restoring an older one. The save's coordinator chooses the base
and every rank receives it, so every rank saves against the same checkpoint whatever its
own listing of the root would say. A failure to list or read the root there (an
``OSError``) makes every rank save in full, with a warning: a full save is always safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torchstow.core.layout.incremental import base_problem
from torchstow.core.protocol.collective import Collective
from torchstow.core.protocol.steps import broadcast_from_coordinator
from torchstow.core.storage.backend import StoreBackend
from torchstow.management.steps import step_uri
from torchstow.plugins.resolve import backend_at

__all__ = ["choose_base"]

logger = logging.getLogger("torchstow.management")


def _problem_at(uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """Why the checkpoint at ``uri`` cannot be an incremental save's base (None when it can)."""
    text, backend = backend_at(uri, storage_options)
    assert isinstance(backend, StoreBackend)  # a manager saving incrementally checked its root
    return base_problem(backend.open_store(text))


def _candidates(step: int, newest: int | None, listed: Callable[[], Iterable[int]]) -> Iterator[int]:
    """The steps before ``step`` to try, each once: ``newest`` first, then (listed only
    when asked for) the root's, newest first."""
    tried = set()
    if newest is not None and newest < step:
        tried.add(newest)
        yield newest
    for candidate in sorted(listed(), reverse=True):
        if candidate < step and candidate not in tried:
            tried.add(candidate)
            yield candidate


def _newest_intact(
    root: str,
    step: int,
    storage_options: dict[str, Any] | None,
    newest: int | None,
    listed: Callable[[], Iterable[int]],
) -> str | None:
    """The coordinator's side of :func:`choose_base`."""
    passed_over = False
    try:
        for candidate in _candidates(step, newest, listed):
            uri = step_uri(root, candidate)
            problem = _problem_at(uri, storage_options)
            if problem is None:
                return uri
            passed_over = True
            logger.warning("step %d is not saved against step %d: %s", step, candidate, problem)
    except OSError as exc:
        logger.warning("step %d: looking for a base under %s failed: %s; a full save", step, root, exc)
        return None
    if passed_over:
        logger.warning(
            "step %d: no intact torchstow step under %s to share files with: a full save", step, root
        )
    return None


def choose_base(
    coll: Collective,
    root: str,
    step: int,
    storage_options: dict[str, Any] | None,
    *,
    listed: Callable[[], Iterable[int]],
    newest: int | None = None,
) -> str | None:
    """The URI of ``<root>/step-<n>`` to save ``step`` against, or None (a full save), the
    same on every rank of ``coll``: its coordinator tries ``newest`` (the newest step the
    manager committed, if any), then the steps ``listed()`` returns (the committed steps
    under ``root``), newest first, and takes the first before ``step`` that is intact.
    Collective: every rank of ``coll`` calls it."""
    return broadcast_from_coordinator(
        coll,
        "incremental base",
        lambda: _newest_intact(root, step, storage_options, newest, listed),
    )
