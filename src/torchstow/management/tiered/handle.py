"""``TieredSave``: one step on its way through the levels, and ``StepInfo``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["LEVELS", "PhaseStats", "StepInfo", "TieredSave"]

#: The durability levels in the order a step reaches them.
LEVELS = ("staged", "fast", "replicated", "durable")


@dataclass(frozen=True)
class StepInfo:
    """A step and the tiers holding a complete copy of it (``"fast"``, ``"durable"``)."""

    step: int
    tiers: tuple[str, ...]


@dataclass
class PhaseStats:
    """What one phase of a save moved on this rank, how long it took, and when it ended
    (``time.time()``)."""

    bytes: int = 0
    seconds: float = 0.0
    ended_at: float = 0.0


@dataclass
class _State:
    reached: int = -1  # index in LEVELS
    error: BaseException | None = None
    failed_level: int | None = None
    stats: dict[str, PhaseStats] = field(default_factory=dict)


def _index(level: str) -> int:
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; one of {', '.join(LEVELS)}")
    return LEVELS.index(level)


class TieredSave:
    """The save of one step: ``level`` reached so far, ``wait(level)``, ``result()``, ``stats``.

    ``due`` is the highest level this step will reach when nothing fails:
    ``"durable"`` for a persist step, else ``"replicated"``.
    """

    def __init__(self, step: int, due: str) -> None:
        self.step = step
        self.due = due
        self._state = _State()
        self._changed = threading.Condition()

    @property
    def level(self) -> str | None:
        """The highest level reached (None before staging is over)."""
        reached = self._state.reached
        return LEVELS[reached] if reached >= 0 else None

    @property
    def stats(self) -> dict[str, PhaseStats]:
        """Bytes and seconds of each phase done so far, by level name."""
        return dict(self._state.stats)

    def _reach(self, level: str, nbytes: int, started: float) -> None:
        with self._changed:
            self._state.stats[level] = PhaseStats(nbytes, time.perf_counter() - started, time.time())
            self._state.reached = _index(level)
            self._changed.notify_all()

    def _fail(self, error: BaseException) -> None:
        """The phase after the highest level reached failed: no higher level will come."""
        with self._changed:
            self._state.error = error
            self._state.failed_level = self._state.reached + 1
            self._changed.notify_all()

    def _clear_error(self) -> None:
        """A retried phase succeeded: forget the failure it had."""
        with self._changed:
            self._state.error = None
            self._state.failed_level = None

    def _over(self, target: int) -> bool:
        state = self._state
        return state.reached >= target or (state.failed_level is not None and state.failed_level <= target)

    def wait(self, level: str = "durable", timeout: float | None = None) -> None:
        """Block until ``level`` is reached (a level beyond ``due`` means ``due``).

        Raises the failure that stopped the step short of it (a
        :class:`~torchstow.errors.CheckpointException` when a collective phase
        failed), or TimeoutError.
        """
        target = min(_index(level), _index(self.due))
        with self._changed:
            if not self._changed.wait_for(lambda: self._over(target), timeout):
                raise TimeoutError(f"step {self.step} did not reach {LEVELS[target]!r} within {timeout}s")
            if self._state.reached < target:
                assert self._state.error is not None
                raise self._state.error

    def result(self, timeout: float | None = None) -> str:
        """Wait for the level this step is due; returns it."""
        self.wait(self.due, timeout)
        return self.due

    def exception(self) -> BaseException | None:
        """The failure that stopped this step so far, or None."""
        return self._state.error

    def done(self) -> bool:
        """Whether the step reached its due level or failed."""
        return self._over(_index(self.due))

    def __repr__(self) -> str:
        failed = " failed" if self._state.error is not None else ""
        return f"<TieredSave step {self.step} level={self.level!r} due={self.due!r}{failed}>"
