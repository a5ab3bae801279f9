"""The exceptions torchstow raises.

Every error derives from :class:`TorchstowError`. Where Python or
torch.distributed.checkpoint has a familiar built-in for the same situation,
the error subclasses it too, so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import traceback
from typing import ClassVar

__all__ = [
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointTimeoutError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "IncompleteCheckpointError",
    "PickleNotAllowedError",
    "PluginConflictError",
    "RemoteError",
    "SaveInFlightError",
    "StateDictMismatchError",
    "StorageFullError",
    "StorageIOError",
    "TorchstowError",
    "UnknownBackendError",
]


class TorchstowError(Exception):
    """Base class of every torchstow error."""


class UnknownBackendError(TorchstowError, ValueError):
    """No installed backend handles the scheme of a URI."""


class CheckpointNotFoundError(TorchstowError, FileNotFoundError):
    """There is no checkpoint (and no data of one) at the given location."""


class IncompleteCheckpointError(TorchstowError):
    """Data files exist at the location, but no committed manifest."""


class CorruptCheckpointError(TorchstowError):
    """A manifest or data file cannot be read back (truncated, malformed)."""


class ChecksumMismatchError(CorruptCheckpointError):
    """Bytes read back do not match the checksum recorded at save time."""


class FormatVersionError(TorchstowError):
    """The manifest was written by a newer, incompatible format version."""


class StateDictMismatchError(TorchstowError, RuntimeError):
    """The state dict and the checkpoint disagree on keys, shapes or dtypes."""

    def __init__(
        self,
        message: str,
        *,
        missing_keys: list[str] | None = None,
        unexpected_keys: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing_keys = missing_keys or []
        self.unexpected_keys = unexpected_keys or []
        self.mismatched = mismatched or []


class PickleNotAllowedError(TorchstowError):
    """A value needs full pickle, but ``allow_pickle=True`` was not passed."""


class CheckpointExistsError(TorchstowError, FileExistsError):
    """A committed checkpoint exists at the target and ``overwrite`` is False."""


class SaveInFlightError(TorchstowError):
    """A save may still be writing at the location (files no committed manifest names,
    younger than gc's grace period): ``torchstow rm`` refuses without ``--force``."""


class StorageIOError(TorchstowError, OSError):
    """A storage operation failed: permanently, or transiently more often than retried.

    ``attempts`` is how many times it was tried; ``transient`` whether the
    last failure was of a kind that retrying might have cured.
    """

    def __init__(self, message: str, *, attempts: int = 1, transient: bool = False) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.transient = transient


class StorageFullError(StorageIOError):
    """The store has no room for the checkpoint (ENOSPC, a full tmpfs, a quota)."""


class PluginConflictError(TorchstowError):
    """Two plugins claim the same URI scheme and neither is preferred."""


class RemoteError(TorchstowError):
    """Stands in for an exception raised on another rank that could not be sent intact.

    An exception whose class cannot be pickled, or not unpickled where it
    arrives, travels as its type name, message and formatted traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


Failure = tuple[BaseException, traceback.StackSummary]


class CheckpointException(TorchstowError):  # noqa: N818 (the name DCP users know)
    """A collective save or load failed on one or more ranks.

    ``failures`` maps each failed rank to the exception raised there and the
    stack where it was raised. Every rank of the group raises the same
    exception. When all failed ranks raised the same torchstow error (a
    missing checkpoint, a mismatched state dict), the exception is also an
    instance of that class (where it is built from a message alone, as
    torchstow's own are) and carries its attributes (``missing_keys`` …):
    ``except CheckpointNotFoundError`` works around a collective call as it
    would around a local one. Other exceptions are only in ``failures``.
    """

    _specialised: ClassVar[dict[type[BaseException], type[CheckpointException]]] = {}

    def __init__(self, message: str, failures: dict[int, Failure]) -> None:
        super().__init__(message)
        self.message = message
        self.failures = failures

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (CheckpointException.from_failures, ("", self.failures, self.message))

    @classmethod
    def from_failures(
        cls, step: str, failures: dict[int, Failure], message: str | None = None
    ) -> CheckpointException:
        """Build the exception for the failures collected at protocol ``step``."""
        if message is None:
            # Ranks that failed alike (SPMD ranks do) share a line: not one copy per rank of a
            # message that may list every key of a state dict.
            alike: dict[tuple[str, str], list[int]] = {}
            for rank in sorted(failures):
                exc, _ = failures[rank]
                alike.setdefault((type(exc).__name__, message_of(exc)), []).append(rank)
            lines = [f"checkpoint {step} failed on {len(failures)} rank(s):"]
            for (name, text), ranks in alike.items():
                lines.append(f"  {_ranks(ranks)}: {name}: {text}")
            message = "\n".join(lines)
        kind = _common_error_class(failures)
        if kind is None:
            return cls(message, failures)
        try:
            exc = cls._specialise(kind)(message, failures)
            first, _ = failures[min(failures)]
            for name, value in vars(first).items():
                if name not in ("message", "failures"):
                    setattr(exc, name, value)
        except Exception:  # a class (a plugin's) that is not built from a message alone
            return cls(message, failures)
        return exc

    @classmethod
    def _specialise(cls, kind: type[BaseException]) -> type[CheckpointException]:
        special = cls._specialised.get(kind)
        if special is None:
            special = type(f"CheckpointException[{kind.__name__}]", (cls, kind), {})
            special.__module__ = cls.__module__
            cls._specialised[kind] = special
        return special


def message_of(exc: BaseException) -> str:
    """``str(exc)``, or what can be said of it where its ``__str__`` raises (a user's
    exception class with a bug there must not replace the failure it reports)."""
    try:
        return str(exc)
    except Exception:
        try:
            return repr(exc)
        except Exception:
            return f"<{type(exc).__name__} whose str() and repr() raise>"


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, or ``ranks 0-2, 5`` (sorted ranks, runs as ranges)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    return "ranks " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _common_error_class(failures: dict[int, Failure]) -> type[BaseException] | None:
    kinds = {type(exc) for exc, _ in failures.values()}
    if len(kinds) != 1:
        return None
    (kind,) = kinds
    if not issubclass(kind, TorchstowError) or issubclass(kind, CheckpointException | RemoteError):
        return None
    return kind


class CheckpointTimeoutError(CheckpointException, TimeoutError):
    """A rank lost contact with its group during a collective save or load.

    Another rank died, stalled, or did not reach the same step within the
    timeout. ``failures`` is empty (no rank reported an exception);
    ``rank`` is the rank that raised it and ``step`` the protocol step.
    """

    def __init__(
        self, message: str, failures: dict[int, Failure] | None = None, *, rank: int = -1, step: str = ""
    ) -> None:
        super().__init__(message, failures or {})
        self.rank = rank
        self.step = step

    def __reduce__(self) -> tuple[object, ...]:
        return (_timeout_error, (self.message, self.rank, self.step))


def _timeout_error(message: str, rank: int, step: str) -> CheckpointTimeoutError:
    return CheckpointTimeoutError(message, rank=rank, step=step)
