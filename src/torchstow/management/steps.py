"""The step of a checkpoint: its user metadata ``step``, else the number its name ends with;
and where a manager keeps a step (:func:`step_uri`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["check_step_number", "is_step_uri", "names_a_step", "step_of", "step_uri"]

# A trailing number counts when it is the whole name or follows a separator
# (step-100, checkpoint_100, iter.7) or a word that says what it counts
# (step100, global_step100, iter7): "s3" or "v2" name no step.
_TRAILING_STEP = re.compile(
    r"^(?:.*?(?:[-_.=:]|step|steps|iter|iteration|ckpt|checkpoint|epoch))?(\d+)$", re.IGNORECASE
)


def step_uri(root: str, step: int) -> str:
    """Where a manager keeps the checkpoint of ``step`` under ``root``: ``<root>/step-<step>``."""
    return f"{root}/{_step_name(step)}"


def _step_name(step: int) -> str:
    return f"step-{step}"


def is_step_uri(uri: str, step: int | None) -> bool:
    """Whether ``uri``, a checkpoint of step ``step``, lies where a manager keeps that step
    (its name is ``step-<step>``): a manager's own step, which its retention may count and
    delete; ``best``, ``step-007`` or ``iter_0000007`` beside its steps are not."""
    return step is not None and os.path.basename(uri.rstrip("/")) == _step_name(step)


def names_a_step(uri: str) -> bool:
    """Whether the name of ``uri`` ends in a step (``step-100``, ``iter_0001000``; not ``best``
    or ``final``, whatever their user metadata says): a step of a run, which ``prune`` and a
    manager count."""
    return step_of(uri) is not None


def step_of(uri: str, user_metadata: Mapping[str, Any] | None = None) -> int | None:
    """The step of the checkpoint at ``uri``.

    The integer ``step`` of its user metadata when there is one, else the
    number its last path component ends with when that number is the whole
    name or follows a separator (``step-100``, ``checkpoint_100``, ``100``)
    or a counting word (``step100``, ``global_step100``); else None.
    """
    if user_metadata:
        step = user_metadata.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    name = os.path.basename(uri.rstrip("/"))
    match = _TRAILING_STEP.match(name)
    return int(match.group(1)) if match else None


def check_step_number(step: int) -> None:
    """ValueError unless ``step`` is a non-negative integer (not a bool, a float or "3"):
    what a manager's ``save`` and ``restore`` take as a step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
