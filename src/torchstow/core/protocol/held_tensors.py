"""The tensors of torchstow's collectives, let go by every backend thread before exit.

A gloo worker thread holds a finished operation, and so its tensors, for a moment after
``wait()`` returned. Dropping its reference to a tensor that has a Python object takes
the GIL (torch keeps the Python object alive while C++ holds the tensor). While the
interpreter finalizes (a rank ending right after a collective, e.g. by a SIGTERM
handler's SystemExit), taking the GIL ends that C++ thread mid-destructor, and the
process aborts ("terminate called without an active exception") instead of exiting with
its own status. Holding the tensors longer from Python does not help: the thread takes
the GIL all the same.

So each operation gets aliases of its tensors (the same memory, tensor objects of their
own, whose use count only the operation raises), held here until their use count is
back to what it was before the operation; and at exit, before the interpreter
finalizes, :func:`_drain` waits until no thread holds any (at most ``DRAIN_LIMIT_S``:
a thread lets go a moment after each operation, and one still running, say towards a
peer that died, is not waited for longer).
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any

from torchstow.core.process_local import ProcessLocal

__all__ = ["aliases"]

#: How long an exiting process waits for backend threads to let go of its tensors.
DRAIN_LIMIT_S = 2.0


class _Held:
    """The aliases of one process (a forked child holds none of its parent's), each with
    its use count before the operation."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tensors: list[tuple[Any, int]] = []

    def _prune(self) -> bool:
        """Forget the aliases no operation holds any more; whether none is left."""
        with self.lock:
            self.tensors = [(t, alone) for t, alone in self.tensors if t._use_count() > alone]
            return not self.tensors

    def add(self, tensors: list[Any]) -> None:
        self._prune()
        with self.lock:
            self.tensors.extend((t, t._use_count()) for t in tensors)

    def drain(self, limit_s: float) -> None:
        """Wait (at most ``limit_s``) until no operation holds any alias."""
        deadline = time.monotonic() + limit_s
        while not self._prune() and time.monotonic() < deadline:
            time.sleep(0.001)


_held: ProcessLocal[_Held] = ProcessLocal(_Held)


@atexit.register
def _drain() -> None:
    _held.get().drain(DRAIN_LIMIT_S)


def aliases(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` of one collective with each tensor (alone or in a list)
    replaced by an alias held as described above; what the backend writes into an alias
    lands in the tensor's own memory."""
    import torch

    made: list[Any] = []

    def alias(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            made.append(value.detach())
            return made[-1]
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [alias(v) for v in value]
        return value

    out = tuple(alias(v) for v in args), {k: alias(v) for k, v in kwargs.items()}
    _held.get().add(made)
    return out
