"""Where one save's time went on this rank, and how many bytes it moved."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

__all__ = ["SaveStats"]


@dataclass
class SaveStats:
    """Seconds per phase and bytes of one save, as this rank saw them.

    ``seconds`` maps each phase that has finished on this rank to its
    duration, in the order the phases ran:

    - ``stage``: copying the state dict (async saves only);
    - ``plan``: this rank's local plan;
    - ``coordinate``: the global plan (the coordinator only, and not when a
      cached plan was reused);
    - ``write``: writing this rank's data;
    - ``commit``: writing the manifest (the coordinator only).

    A phase that has not finished yet (or does not run on this rank) is
    absent, so the stats of a save still running are partial. Time spent
    waiting for the other ranks between phases is in no phase.
    ``bytes_staged`` counts the tensor bytes of the staged copy (0 when
    nothing was staged), ``bytes_written`` the data bytes this rank wrote (an
    incremental save writes no bytes for tensors shared with its base).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    bytes_staged: int = 0
    bytes_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def total_seconds(self) -> float:
        """The sum of the finished phases' seconds."""
        with self._lock:
            return sum(self.seconds.values())

    def record(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase`` (safe while another thread takes a :meth:`snapshot`)."""
        with self._lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def snapshot(self) -> SaveStats:
        """A copy that later phases leave as it is."""
        with self._lock:
            return replace(self, seconds=dict(self.seconds))
