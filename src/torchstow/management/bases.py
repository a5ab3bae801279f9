"""What a managed save learns from its root before it writes: whether it may save at all
(:func:`check_step`), and the base of an incremental save (:func:`choose_base`); one rule for
``CheckpointManager`` and the tiered manager.

A save of a step older than a committed step under the root is refused on every rank with
a :class:`~torchstow.errors.CheckpointExistsError` before anything is written: pruning
orders by step, so it would delete the new step and keep the abandoned newer ones (and a
restore would load those). The coordinator lists the root once and decides for every rank.

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
from torchstow.errors import CheckpointExistsError
from torchstow.management.catalog import list_steps
from torchstow.management.steps import step_uri
from torchstow.plugins.resolve import backend_at

__all__ = ["check_step", "choose_base"]

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


def _refuse_newer(root: str, step: int, steps: Iterable[int], storage_options: dict[str, Any] | None) -> None:
    """Raise CheckpointExistsError when a step after ``step`` is among ``steps``, naming
    where the newer steps lie (``iter_0000030`` or ``step-040`` as much as ``step-30``)."""
    newer = sorted(s for s in steps if s > step)
    if not newer:
        return
    shown = ", ".join(map(str, newer[:5])) + (", ..." if len(newer) > 5 else "")
    try:
        found = list_steps(root, storage_options=storage_options)
        uris = [info.uri for info in found if info.step is not None and info.step > step]
    except OSError:
        uris = []
    where = ", ".join(uris[:5]) + (f" and {len(uris) - 5} more" if len(uris) > 5 else "")
    raise CheckpointExistsError(
        f"step {step} is older than the committed step(s) {shown} under {root}: nothing was "
        f"saved (a restore would load step {newer[-1]}, and pruning, which keeps the newest "
        f"steps, could delete step {step}); to go on from an older step, delete the newer ones "
        f"first, or move them out of {root} (torchstow.delete(uri) or `torchstow rm URI`"
        f"{': ' + where if where else ''}), or save under a step above {newer[-1]}"
    )


def check_step(
    coll: Collective,
    root: str,
    step: int,
    storage_options: dict[str, Any] | None,
    *,
    listed: Callable[[], Iterable[int]],
    base: bool = False,
    newest: int | None = None,
) -> tuple[bool, str | None]:
    """Refuse ``step`` when ``listed()`` (the committed steps under ``root``) has a newer
    one: every rank of ``coll`` raises the same CheckpointException that is a
    CheckpointExistsError. Otherwise ``(listed, base_uri)``: whether the root was listed
    (False when listing it failed: an ``OSError``, logged, and the save goes on), and with
    ``base`` the base :func:`choose_base` would pick, from the same listing and in the same
    broadcast (else None). Collective: every rank of ``coll`` calls it."""

    def decide() -> tuple[bool, str | None]:
        try:
            steps = sorted(listed())
        except OSError as exc:
            logger.warning("step %d: listing %s failed: %s; saving without checking it", step, root, exc)
            return False, _newest_intact(root, step, storage_options, newest, listed) if base else None
        _refuse_newer(root, step, steps, storage_options)
        return True, _newest_intact(root, step, storage_options, newest, lambda: steps) if base else None

    found: tuple[bool, str | None] = broadcast_from_coordinator(coll, "managed save check", decide)
    return found
