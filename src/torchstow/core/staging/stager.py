"""Staging: copying a state dict into CPU memory that training does not touch.

:class:`StateDictStager` deep-copies a state dict, putting every tensor's
storage into a CPU buffer it caches per source storage: staging the same
state dict again copies into the same buffers, so after the first save no
memory is allocated and the copy runs at memory bandwidth. Buffers are pinned
when an accelerator exists (device-to-host copies then run asynchronously)
and live in shared memory when another process writes them.

:class:`DefaultStager` runs a stager synchronously or on a background thread,
with non-blocking device copies on a side stream.
"""

from __future__ import annotations

import copyreg
import logging
import threading
import types
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from torchstow.core.dtensors import dtensor_type
from torchstow.core.layout.digest_memo import forget_staged, note_staged
from torchstow.core.staging.arena import SharedMemoryArena

__all__ = [
    "CheckpointStagerConfig",
    "DefaultStager",
    "StateDictStager",
    "accelerator_available",
]

logger = logging.getLogger(__name__)

_ATOMIC = frozenset(
    {
        type(None),
        type(Ellipsis),
        type(NotImplemented),
        int,
        float,
        bool,
        complex,
        str,
        bytes,
        range,
        type,
        property,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.CodeType,
        weakref.ref,
        torch.dtype,
        torch.device,
        torch.layout,
        torch.memory_format,
        torch.Size,
    }
)

_no_pinning_logged = False
_no_pinning_lock = threading.Lock()


def accelerator_available() -> bool:
    """Whether an accelerator (CUDA, XPU, ...) is usable in this process."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _log_no_pinning() -> None:
    global _no_pinning_logged
    with _no_pinning_lock:
        if not _no_pinning_logged:
            _no_pinning_logged = True
            logger.warning(
                "pinned staging memory needs an accelerator and none is available: staging into "
                "pageable memory instead"
            )


class _StagingPass:
    """One deep copy: the objects and storages copied so far in this call."""

    def __init__(self, stager: StateDictStager, non_blocking: bool) -> None:
        self.stager = stager
        self.non_blocking = non_blocking
        self.memo: dict[int, Any] = {}
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.keep: list[Any] = []  # originals stay alive, so their ids stay unique
        self.devices: set[torch.device] = set()

    def copy(self, x: Any) -> Any:
        key = id(x)
        if key in self.memo:
            return self.memo[key]
        cls = type(x)
        if cls in _ATOMIC or issubclass(cls, type):
            return x
        if isinstance(x, torch.Tensor):
            y: Any = self.copy_tensor(x)
        elif cls is dict:
            y = self.copy_dict(x)
        elif cls is list:
            y = self.copy_list(x)
        elif cls is tuple or (issubclass(cls, tuple) and hasattr(cls, "_fields")):
            y = self.copy_tuple(x)
        else:
            y = self.copy_other(x)
        if y is not x:
            self.memo[key] = y
            self.keep.append(x)
        return y

    def copy_dict(self, x: dict[Any, Any]) -> dict[Any, Any]:
        y: dict[Any, Any] = {}
        self.memo[id(x)] = y
        for key, value in x.items():
            y[self.copy(key)] = self.copy(value)
        return y

    def copy_list(self, x: list[Any]) -> list[Any]:
        y: list[Any] = []
        self.memo[id(x)] = y
        y.extend(self.copy(value) for value in x)
        return y

    def copy_tuple(self, x: tuple[Any, ...]) -> tuple[Any, ...]:
        items = [self.copy(value) for value in x]
        if id(x) in self.memo:  # reached again through a cycle below it
            return self.memo[id(x)]
        if all(a is b for a, b in zip(items, x)):
            return x
        if hasattr(x, "_fields"):
            return type(x)(*items)
        return tuple(items)

    def copy_other(self, x: Any) -> Any:
        """Any other object, the way copy.deepcopy does it, with tensors staged."""
        deepcopy = getattr(x, "__deepcopy__", None)
        if deepcopy is not None:
            return deepcopy(self.memo)
        reductor = copyreg.dispatch_table.get(type(x))
        rv = reductor(x) if reductor is not None else x.__reduce_ex__(4)
        if isinstance(rv, str):
            return x
        return self.reconstruct(x, *rv)

    def reconstruct(
        self,
        x: Any,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        state: Any = None,
        listiter: Any = None,
        dictiter: Any = None,
        *_: Any,
    ) -> Any:
        y = func(*(self.copy(arg) for arg in args))
        self.memo[id(x)] = y
        if state is not None:
            state = self.copy(state)
            if hasattr(y, "__setstate__"):
                y.__setstate__(state)
            else:
                slots = None
                if isinstance(state, tuple) and len(state) == 2:
                    state, slots = state
                if state:
                    y.__dict__.update(state)
                for name, value in (slots or {}).items():
                    setattr(y, name, value)
        if listiter is not None:
            for item in listiter:
                y.append(self.copy(item))
        if dictiter is not None:
            for key, value in dictiter:
                y[self.copy(key)] = self.copy(value)
        return y

    def copy_tensor(self, x: torch.Tensor) -> torch.Tensor:
        dtensor = dtensor_type()
        if dtensor is not None and isinstance(x, dtensor):
            local = self.copy(x._local_tensor)  # type: ignore[attr-defined]
            if self.stager.track_sources:
                note_staged(x._local_tensor, local, x)  # type: ignore[attr-defined]
            y: torch.Tensor = dtensor(local, x._spec, requires_grad=x.requires_grad)  # type: ignore[attr-defined]
        elif x.device.type == "meta":
            y = x.detach()  # no data to copy
        elif x.layout != torch.strided or x.is_quantized or x.is_nested:
            y = x.detach().to("cpu", copy=True)  # not cached: these have no single storage
        else:
            # A lazily conjugated or negated view keeps its flag beside unchanged
            # memory: stage its values, since the storage alone would lose the flag.
            src = x
            if x.is_conj() or x.is_neg():
                src = x.detach().resolve_conj().resolve_neg()
                self.keep.append(src)  # its storage is cached by id: keep it alive
            storage = self.copy_storage(src.untyped_storage())
            y = torch.empty(0, dtype=x.dtype).set_(storage, src.storage_offset(), src.size(), src.stride())
            if self.stager.track_sources and src is x:
                note_staged(x, y, x)
            if x.requires_grad:
                y.requires_grad_(True)
            if isinstance(x, torch.nn.Parameter):
                y = torch.nn.Parameter(y, requires_grad=x.requires_grad)
            elif type(x) is not torch.Tensor:
                y = y.as_subclass(type(x))
        self.memo[id(x)] = y  # before the attributes, which may refer back to x
        self.keep.append(x)
        for name, value in getattr(x, "__dict__", {}).items():
            setattr(y, name, self.copy(value))
        return y

    def copy_storage(self, source: torch.UntypedStorage) -> torch.UntypedStorage:
        key = id(source)
        staged = self.storages.get(key)
        if staged is None:
            self.keep.append(source)
            if source.device.type != "cpu":
                self.devices.add(source.device)
            staged = self.storages[key] = self.stager._stage_storage(source, self.non_blocking)
            forget_staged(staged)  # what it held before is gone
        return staged


class StateDictStager:
    """Deep-copies state dicts to CPU memory, reusing one buffer per source storage.

    ``stage`` keeps the structure (dicts, lists, tuples, namedtuples,
    dataclasses, other objects as ``copy.deepcopy`` would), storage sharing
    and views (same offsets and strides), custom tensor attributes,
    ``requires_grad`` and ``nn.Parameter``; DTensors are staged shard-locally
    and keep their spec. Staging again copies into the cached buffers, so a
    staged state dict is overwritten by the next ``stage`` call: finish with
    it first. ``pin_memory`` without an accelerator falls back to pageable
    memory (logged once); ``share_memory`` puts buffers in shared memory
    that another process can map. ``track_sources`` notes which tensor (and
    version) each staged tensor was copied from, so an incremental save with
    ``trust_version_counter=True`` can reuse its digest (see
    :mod:`torchstow.core.layout.digest_memo`). Not thread-safe.
    """

    def __init__(self, pin_memory: bool = False, share_memory: bool = False) -> None:
        if pin_memory and not accelerator_available():
            _log_no_pinning()
            pin_memory = False
        self.pin_memory = pin_memory
        self.share_memory = share_memory
        self.track_sources = False
        self._cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
        pin_segments = pin_memory and torch.cuda.is_available()
        self._arena = SharedMemoryArena(pin=pin_segments) if share_memory else None
        self._closed = False

    @property
    def shared_memory(self) -> SharedMemoryArena | None:
        """The arena holding the buffers when ``share_memory``, else None."""
        return self._arena

    def stage(self, state_dict: Any, non_blocking: bool = False) -> Any:
        """A deep copy of ``state_dict`` whose tensors live on the CPU.

        With ``non_blocking``, device-to-host copies are only enqueued on the
        current stream: synchronize it before reading the result.
        """
        return self.stage_pass(state_dict, non_blocking)[0]

    @torch.no_grad()
    def stage_pass(self, state_dict: Any, non_blocking: bool = False) -> tuple[Any, set[torch.device]]:
        """:meth:`stage`, also returning the devices copied from."""
        if self._closed:
            raise RuntimeError("this StateDictStager is closed")
        staging = _StagingPass(self, non_blocking)
        return staging.copy(state_dict), staging.devices

    def _stage_storage(self, source: torch.UntypedStorage, non_blocking: bool) -> torch.UntypedStorage:
        nbytes = source.nbytes()
        staged = self._cache.get(source)
        if staged is None or staged.nbytes() != nbytes:
            staged = self._allocate(nbytes)
            self._cache[source] = staged
        if nbytes:
            staged.copy_(source, non_blocking=non_blocking)
        return staged

    def _allocate(self, nbytes: int) -> torch.UntypedStorage:
        if self._arena is not None:
            return self._arena.allocate(nbytes)
        if self.pin_memory:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
        return torch.UntypedStorage(nbytes)

    def cache_stats(self) -> tuple[int, int]:
        """(number of cached staging buffers, their total bytes)."""
        sizes = [staged.nbytes() for staged in self._cache.values()]
        return len(sizes), sum(sizes)

    def close(self) -> None:
        """Drop the cache. Staged tensors still referenced stay valid; their
        memory is returned once they are dropped too."""
        self._closed = True
        self._cache.clear()
        if self._arena is not None:
            self._arena.close()
        accelerator = getattr(torch, "accelerator", None)
        if self.pin_memory and hasattr(accelerator, "empty_host_cache"):
            accelerator.empty_host_cache()  # type: ignore[union-attr]


@dataclass
class CheckpointStagerConfig:
    """How :class:`DefaultStager` stages.

    ``None`` means "on when an accelerator is present". ``use_shared_memory``
    puts the buffers in shared memory (needed when another process writes
    them); ``use_async_staging`` stages on a background thread and returns a
    future; ``use_non_blocking_copy`` copies device tensors asynchronously on
    a side stream.
    """

    use_pinned_memory: bool | None = None
    use_shared_memory: bool = False
    use_async_staging: bool = True
    use_non_blocking_copy: bool | None = None


class DefaultStager:
    """Stages state dicts as :class:`CheckpointStagerConfig` says.

    ``stage`` returns the staged state dict, or a ``concurrent.futures.Future``
    of it with ``use_async_staging``. Non-blocking copies run on a side
    stream that first waits for the work queued on the caller's current
    stream, and are synchronized before the result is handed out. Device
    tensors should be on the device current when the stager was made (copies
    from other devices are synchronized with their whole device). Staging
    again reuses (and overwrites) the buffers.
    """

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        self.config = config = config or CheckpointStagerConfig()
        accelerator = accelerator_available()
        non_blocking = accelerator if config.use_non_blocking_copy is None else config.use_non_blocking_copy
        if non_blocking and not accelerator:
            raise ValueError(
                "use_non_blocking_copy=True needs an accelerator, and none is available; leave it "
                "None (on only when an accelerator is present) or set it to False"
            )
        pin = accelerator if config.use_pinned_memory is None else config.use_pinned_memory
        self._stager = StateDictStager(pin_memory=pin, share_memory=config.use_shared_memory)
        # The stream is made here, on the caller's thread and current device.
        self._stream: Any = torch.Stream() if non_blocking else None
        self._executor = None
        if config.use_async_staging:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="torchstow-staging")
        self._closed = False

    @property
    def state_dict_stager(self) -> StateDictStager:
        """The underlying :class:`StateDictStager` (its cache and memory)."""
        return self._stager

    def stage(self, state_dict: Any) -> Any:
        """The staged copy of ``state_dict``, or a Future of it when staging asynchronously.

        Do not mutate ``state_dict`` until staging is complete.
        """
        if self._closed:
            raise RuntimeError("this DefaultStager is closed")
        ready = None
        if self._stream is not None:
            ready = torch.accelerator.current_stream(self._stream.device).record_event()
        if self._executor is None:
            return self._stage(state_dict, ready)
        return self._executor.submit(self._stage, state_dict, ready)

    def _stage(self, state_dict: Any, ready: Any) -> Any:
        stream = self._stream
        if stream is None:
            return self._stager.stage(state_dict)
        stream.wait_event(ready)
        with stream:
            staged, devices = self._stager.stage_pass(state_dict, non_blocking=True)
        stream.synchronize()
        for device in devices - {stream.device}:
            torch.accelerator.synchronize(device)
        return staged

    def cache_stats(self) -> tuple[int, int]:
        """The stager's (number of buffers, bytes)."""
        return self._stager.cache_stats()

    def close(self) -> None:
        """Wait for staging in progress, stop the thread and free the buffers."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._stager.close()

    def __enter__(self) -> DefaultStager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
