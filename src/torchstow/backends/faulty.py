"""The fault-injecting backend: ``faulty+<inner-uri>?fail=<step>&ranks=<list>&mode=<mode>``.

It wraps the writer and reader of any other backend (the inner URI's) and,
at a chosen protocol step on chosen ranks, raises, returns a failed future,
delays, hangs, kills the process, or corrupts the bytes written; everywhere
else it passes every call through. Tests use it to prove that a failure
anywhere makes every rank fail as one. The grammar is in ``docs/faulty.md``.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode

from torchstow import errors
from torchstow.spi import (
    Backend,
    Buffer,
    ByteStore,
    FileSink,
    ForwardingByteStore,
    ForwardingStorageReader,
    ForwardingStorageWriter,
    LoadPlan,
    LoadPlanner,
    Metadata,
    Register,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
    StoreBackend,
    WriteResult,
    failed_future,
    hookimpl,
    open_backend,
    wrapper_storage_options,
)

__all__ = [
    "MODES",
    "READER_STEPS",
    "WRITER_STEPS",
    "FaultSpec",
    "FaultyBackend",
    "FaultyReader",
    "FaultyWriter",
    "parse_faulty_uri",
]

PREFIX = "faulty+"
OPTION_PREFIX = "faulty."
WRITER_STEPS = ("set_up_storage_writer", "prepare_local_plan", "prepare_global_plan", "write_data", "finish")
READER_STEPS = (
    "read_metadata",
    "set_up_storage_reader",
    "prepare_local_plan",
    "prepare_global_plan",
    "read_data",
)
FUTURE_STEPS = ("write_data", "read_data")
MODES = ("raise", "future", "delay", "hang", "kill", "exit", "corrupt")
_PARAMS = ("fail", "ranks", "mode", "exc", "seconds", "code")


def _exception_class(name: str) -> type[Exception]:
    """A built-in or torchstow exception class that takes a message."""
    kind = getattr(builtins, name, None) or getattr(errors, name, None)
    if (
        not isinstance(kind, type)
        or not issubclass(kind, Exception)
        or issubclass(kind, errors.CheckpointException)
    ):
        raise ValueError(
            f"faulty: exc={name!r} is not a built-in or torchstow exception class "
            "(e.g. ValueError, OSError, RuntimeError, TimeoutError, CheckpointNotFoundError)"
        )
    return kind


@dataclass(frozen=True)
class FaultSpec:
    """Which steps fail, on which ranks (None: all), and how."""

    steps: frozenset[str] = frozenset()
    ranks: frozenset[int] | None = None
    mode: str = "raise"
    exception: type[Exception] = RuntimeError
    seconds: float = 1.0
    exit_code: int = 1

    def applies(self, step: str) -> bool:
        """Whether ``step`` fails on this process's rank."""
        return step in self.steps and (self.ranks is None or current_rank() in self.ranks)


def current_rank() -> int:
    """This process's global rank in torch.distributed, or 0 when it is not initialized."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _split_query(uri: str) -> tuple[str, str]:
    if not uri.startswith(PREFIX):
        raise ValueError(f"{uri!r} is not a faulty URI (faulty+<inner-uri>?fail=<step>&...)")
    rest = uri[len(PREFIX) :]
    inner, sep, query = rest.rpartition("?")
    return (inner, query) if sep else (rest, "")


def parse_faulty_uri(uri: str) -> tuple[str, FaultSpec]:
    """Split ``faulty+<inner-uri>?<params>`` into the inner URI and the fault."""
    inner, query = _split_query(uri)
    if "://" not in inner:
        raise ValueError(f"{uri!r}: the wrapped location must be a URI with a scheme (faulty+file:///dir)")
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _PARAMS:
            raise ValueError(f"{uri!r}: unknown parameter {key!r}; the parameters are {', '.join(_PARAMS)}")
        params[key] = value
    steps = frozenset(s for s in params.get("fail", "").split(",") if s)
    unknown = steps - set(WRITER_STEPS) - set(READER_STEPS)
    if unknown:
        raise ValueError(
            f"{uri!r}: unknown step(s) {sorted(unknown)}; writer steps: {', '.join(WRITER_STEPS)}; "
            f"reader steps: {', '.join(READER_STEPS)}"
        )
    mode = params.get("mode", "raise")
    if mode not in MODES:
        raise ValueError(f"{uri!r}: unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    if mode == "future" and steps - set(FUTURE_STEPS):
        raise ValueError(f"{uri!r}: mode=future applies to {' and '.join(FUTURE_STEPS)} only")
    if mode == "corrupt" and steps != {"write_data"}:
        raise ValueError(f"{uri!r}: mode=corrupt applies to fail=write_data only")
    ranks = None
    if params.get("ranks", "*") != "*":
        try:
            ranks = frozenset(int(r) for r in params["ranks"].split(","))
        except ValueError:
            raise ValueError(f"{uri!r}: ranks must be comma-separated integers or *") from None
    try:
        seconds = float(params.get("seconds", 1.0))
        exit_code = int(params.get("code", 1))
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    spec = FaultSpec(
        steps, ranks, mode, _exception_class(params.get("exc", "RuntimeError")), seconds, exit_code
    )
    return inner, spec


def _inject(spec: FaultSpec, step: str, where: str) -> None:
    """Carry out the fault at ``step``; returns only for ``delay`` (and modes handled elsewhere)."""
    if spec.mode == "raise":
        raise spec.exception(f"injected fault in {step} on rank {current_rank()} ({where})")
    if spec.mode == "delay":
        time.sleep(spec.seconds)
    elif spec.mode == "hang":
        _hang()
    elif spec.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.mode == "exit":
        os._exit(spec.exit_code)


def _hang() -> NoReturn:
    while True:
        threading.Event().wait(3600)


def _failed_future(spec: FaultSpec, step: str, where: str) -> concurrent.futures.Future[Any]:
    return failed_future(
        spec.exception(f"injected failed future from {step} on rank {current_rank()} ({where})")
    )


class _Faults:
    """The fault of one writer or reader, checked at each step."""

    def __init__(self, spec: FaultSpec, where: str) -> None:
        self.spec = spec
        self.where = where

    def step(self, step: str) -> None:
        if self.spec.applies(step) and self.spec.mode not in ("future", "corrupt"):
            _inject(self.spec, step, self.where)

    def failed_future(self, step: str) -> concurrent.futures.Future[Any] | None:
        if self.spec.applies(step) and self.spec.mode == "future":
            return _failed_future(self.spec, step, self.where)
        self.step(step)
        return None


class _Wrapper:
    """What the faulty writer and reader share: the fault, ``reset`` (``inner`` is set by them)."""

    inner: Any
    faults: _Faults

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Reset the inner object; a ``faulty+`` id also replaces the fault."""
        if checkpoint_id is not None and str(checkpoint_id).startswith(PREFIX):
            checkpoint_id, spec = parse_faulty_uri(str(checkpoint_id))
            self.faults = _Faults(spec, str(checkpoint_id))
        self.inner.reset(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a faulty URI."""
        return str(checkpoint_id).startswith(PREFIX)


class FaultyWriter(_Wrapper, ForwardingStorageWriter):
    """A writer that injects its fault, then defers to the inner writer."""

    def __init__(self, inner: StorageWriter, spec: FaultSpec, where: str = "") -> None:
        ForwardingStorageWriter.__init__(self, inner)
        self.faults = _Faults(spec, where)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.faults.step("set_up_storage_writer")
        self.inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.faults.step("prepare_local_plan")
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.faults.step("prepare_global_plan")
        return self.inner.prepare_global_plan(plans)

    def renew_plan(self, plan: SavePlan) -> SavePlan | None:
        """None: a faulty save always plans in full, so a fault in global planning fires."""
        return None

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        failed = self.faults.failed_future("write_data")
        return failed if failed is not None else self.inner.write_data(plan, planner)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.faults.step("finish")
        self.inner.finish(metadata, results)


class FaultyReader(_Wrapper, ForwardingStorageReader):
    """A reader that injects its fault, then defers to the inner reader."""

    def __init__(self, inner: StorageReader, spec: FaultSpec, where: str = "") -> None:
        ForwardingStorageReader.__init__(self, inner)
        self.faults = _Faults(spec, where)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.faults.step("read_metadata")
        return self.inner.read_metadata(*args, **kwargs)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.faults.step("set_up_storage_reader")
        self.inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        self.faults.step("prepare_local_plan")
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        self.faults.step("prepare_global_plan")
        return self.inner.prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Any:
        failed = self.faults.failed_future("read_data")
        return failed if failed is not None else self.inner.read_data(plan, planner)


class _CorruptingSink(FileSink):
    """Flips the first byte a data file receives, after the layout checksummed it."""

    def __init__(self, inner: FileSink) -> None:
        self.inner = inner
        self.done = False

    def write(self, buffers: Sequence[Buffer]) -> None:
        if not self.done:
            buffers = list(buffers)
            for i, buf in enumerate(buffers):
                if len(buf):
                    copy = bytearray(buf)
                    copy[0] ^= 0xFF
                    buffers[i] = copy
                    self.done = True
                    break
        self.inner.write(buffers)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class _CorruptingStore(ForwardingByteStore):
    """The inner store, with data files written through :class:`_CorruptingSink` on faulty ranks."""

    def __init__(self, inner: ByteStore, spec: FaultSpec) -> None:
        super().__init__(inner)
        self.spec = spec

    def create(self, name: str) -> FileSink:
        sink = self.inner.create(name)
        return _CorruptingSink(sink) if self.spec.applies("write_data") else sink


class _CorruptingBackend(StoreBackend):
    """A byte-store backend seen through :class:`_CorruptingStore`."""

    def __init__(self, inner: StoreBackend, spec: FaultSpec) -> None:
        super().__init__()
        self.inner = inner
        self.spec = spec

    def open_store(self, uri: str) -> ByteStore:
        return _CorruptingStore(self.inner.open_store(uri), self.spec)

    def tuned_by(self, uri: str) -> StoreBackend:
        return self.inner.tuned_by(uri)

    def list_children(self, prefix: str) -> list[str]:
        return self.inner.list_children(prefix)


class FaultyBackend(Backend):
    """Wraps the backend of ``<inner-uri>`` and injects the fault the URI names.

    The fault's parameters may also be given as storage options ``faulty.<param>``
    (``faulty.fail=finish``; one in the URI's query wins); every other storage option
    goes to the inner backend unchanged.
    """

    schemes = ("faulty",)

    def __init__(self, **storage_options: Any) -> None:
        own = {k[len(OPTION_PREFIX) :]: v for k, v in storage_options.items() if k.startswith(OPTION_PREFIX)}
        unknown = sorted(set(own) - set(_PARAMS))
        if unknown:
            raise TypeError(
                f"FaultyBackend does not take the option(s) {[OPTION_PREFIX + n for n in unknown]}; "
                f"its own options: {', '.join(OPTION_PREFIX + n for n in _PARAMS)}"
            )
        self.fault_params = {
            k: ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v) for k, v in own.items()
        }
        self.storage_options = {k: v for k, v in storage_options.items() if not k.startswith(OPTION_PREFIX)}

    @classmethod
    def extra_storage_options(cls, uri: str) -> set[str] | None:
        """The fault's parameters as ``faulty.<param>``, and the inner backend's options."""
        inner_uri, _ = _split_query(uri)
        if "://" not in inner_uri:
            return None  # parse_faulty_uri says what is wrong with it
        return wrapper_storage_options(inner_uri, OPTION_PREFIX, _PARAMS)

    def _inner(self, uri: str) -> tuple[str, FaultSpec, Backend]:
        if self.fault_params:
            inner, query = _split_query(uri)
            params = {**self.fault_params, **dict(parse_qsl(query, keep_blank_values=True))}
            uri = f"{PREFIX}{inner}?{urlencode(params)}"
        inner_uri, spec = parse_faulty_uri(uri)
        return inner_uri, spec, open_backend(inner_uri, self.storage_options)

    def storage_writer(self, uri: str, *, overwrite: bool = False) -> StorageWriter:
        inner_uri, spec, backend = self._inner(uri)
        if spec.mode == "corrupt":
            if not isinstance(backend, StoreBackend):
                raise ValueError(
                    f"{uri!r}: mode=corrupt needs a byte-store backend; {type(backend).__name__} is not one"
                )
            backend = _CorruptingBackend(backend, spec)
        return FaultyWriter(backend.storage_writer(inner_uri, overwrite=overwrite), spec, inner_uri)

    def storage_reader(self, uri: str) -> StorageReader:
        inner_uri, spec, backend = self._inner(uri)
        return FaultyReader(backend.storage_reader(inner_uri), spec, inner_uri)

    def read_metadata(self, uri: str) -> Metadata:
        inner_uri, _, backend = self._inner(uri)
        return backend.read_metadata(inner_uri)

    def list_children(self, prefix: str) -> list[str]:
        inner_prefix, query = _split_query(prefix)
        _, _, backend = self._inner(prefix)
        suffix = f"?{query}" if query else ""
        return [f"{PREFIX}{child}{suffix}" for child in backend.list_children(inner_prefix)]

    def delete(self, uri: str) -> None:
        inner_uri, _, backend = self._inner(uri)
        backend.delete(inner_uri)


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register the fault-injecting backend for ``faulty+<inner-uri>`` URIs."""
    register(FaultyBackend)
