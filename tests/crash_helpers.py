"""Killing a child process at a known point of a save."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import torch

import torchstow
from torchstow.spi import ForwardingStorageWriter, Metadata, WriteResult


def kill_once_writing(child: subprocess.Popen[str]) -> None:
    """Wait for ``child`` to print ``writing`` (its save is under way), then kill it
    with SIGKILL; the child is gone when this returns, whatever happened."""
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "writing\n", child.stderr.read() if child.stderr else line
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# --------------------------------------------------------------------------- killing at a file event
#
# A save's *file events* are the calls of the filesystem backend that another
# process can observe: creating a directory or a file, writing, linking,
# renaming and unlinking. ``crash_save`` counts them on each rank of a real
# gloo group and kills one rank at one of them (or just after its last one),
# with SIGKILL, or with SIGTERM under a handler that raises SystemExit as
# training scripts and torchelastic do (the save then unwinds before the
# process ends). A fault-free run with ``victim=-1`` lists every rank's events.

_EVENTS = ("makedirs", "open", "writev", "link", "unlink", "replace", "rename")
CRASH_SIGNALS = ("SIGKILL", "SIGTERM")


def crash_state(step: int, world_size: int, rank: int | None = None) -> dict[str, Any]:
    """The state dict of ``step``: one tensor every rank holds, one per rank, a counter.
    ``rank`` None gives every rank's keys (what a resume loads in one process)."""
    gen = torch.Generator().manual_seed(1000 + step)
    shared = torch.randn(512, generator=gen)
    own = {f"rank{r}": torch.randn(96, generator=gen) for r in range(world_size)}
    keys = own if rank is None else {f"rank{rank}": own[f"rank{rank}"]}
    return {"shared": shared, **keys, "step": step}


class _CountingOs:
    """Stands in for the ``os`` module of the filesystem backend: counts its file events
    (with ``under``, only those on paths under it, and writes to files opened there) and
    kills this process at event number ``point`` (just after the last, if ``point``
    equals ``total``)."""

    def __init__(self, point: int, total: int, signame: str, under: str | None = None) -> None:
        self.events: list[str] = []
        self.point = point
        self.total = total
        self.signame = signame
        self.under = under
        self._fds: set[int] = set()  # files opened under ``under``

    def _watched(self, name: str, args: tuple[Any, ...]) -> bool:
        if self.under is None:
            return True
        if name == "writev":
            return args[0] in self._fds
        paths = args[:2] if name in ("link", "replace", "rename") else args[:1]
        return any(os.fspath(p).startswith(self.under) for p in paths)

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name == "close" and self.under is not None:

            def close(fd: int) -> None:
                self._fds.discard(fd)  # the number may name a file elsewhere next
                real(fd)

            return close
        if name not in _EVENTS:
            return real

        def counted(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and not (args[1] if len(args) > 1 else kwargs["flags"]) & os.O_CREAT:
                return real(*args, **kwargs)  # opening for reading changes nothing
            if not self._watched(name, args):
                return real(*args, **kwargs)
            self.events.append(name)
            if len(self.events) - 1 == self.point:
                self._kill()
            result = real(*args, **kwargs)
            if name == "open":
                self._fds.add(result)
            if len(self.events) == self.total == self.point:
                self._kill()
            return result

        return counted

    def _kill(self) -> None:
        os.kill(os.getpid(), getattr(signal, self.signame))


def crash_save(
    rank: int,
    world_size: int,
    root: str,
    victim: int,
    point: int,
    total: int,
    signame: str,
    how: str = "save",
) -> dict[str, Any]:
    """Save step 2 under ``root`` on every rank (``how``: ``save``, or ``async_save`` waited
    for); ``victim`` dies at its file event ``point``.

    Returns this rank's file events and how its save ended.
    """
    from torchstow.backends import filesystem

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    hook = _CountingOs(point if rank == victim else -1, total, signame)
    filesystem.os = hook  # type: ignore[assignment]
    out: dict[str, Any] = {}
    try:
        save = getattr(torchstow, how)
        saved = save(crash_state(2, world_size, rank), f"{root}/step-2", timeout=60)
        if how == "async_save":
            saved.result()
        out["ok"] = True
    except torchstow.CheckpointException as exc:
        out.update(error=type(exc).__name__, notes=getattr(exc, "__notes__", []))
    except SystemExit as exc:  # SIGTERM: the save unwound; now the process ends
        os._exit(int(exc.code or 1))
    finally:
        filesystem.os = os  # type: ignore[assignment]
    out["events"] = hook.events
    return out


def assert_resumes(root: str, world_size: int, options: dict[str, Any] | None = None) -> int:
    """``latest`` + ``load`` under ``root`` give step 1 or step 2, bit-exact; which one."""
    uri = torchstow.latest(root, storage_options=options)
    assert uri is not None and uri.rsplit("/", 1)[-1].split("?")[0] in ("step-1", "step-2"), uri
    step = int(uri.rsplit("/", 1)[-1].split("?")[0].rsplit("-", 1)[-1])
    expected = crash_state(step, world_size)
    target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in expected.items()}
    torchstow.load(target, uri, storage_options=options)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(target[key].view(torch.int32), value.view(torch.int32)), key
        else:
            assert target[key] == value, key
    return step


def crash_after_publish(
    rank: int, world_size: int, prefix: str, suffix: str, options: dict[str, Any], signame: str
) -> dict[str, Any]:
    """Save steps 1 and 2 under ``prefix`` (any backend; ``suffix`` ends each URI); the
    coordinator dies right after its store published step 2's manifest, before any rank
    heard back."""
    from torchstow.backends.filesystem import LocalFileStore
    from torchstow.backends.fsspec.store import FsspecStore

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    torchstow.save(
        crash_state(1, world_size, rank), f"{prefix}/step-1{suffix}", storage_options=options, timeout=60
    )
    if rank == 0:
        for kind in (LocalFileStore, FsspecStore):

            def publish_new(self: Any, name: str, data: bytes, _original: Any = kind.publish_new) -> None:
                _original(self, name, data)
                os.kill(os.getpid(), getattr(signal, signame))

            kind.publish_new = publish_new  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    try:
        torchstow.save(
            crash_state(2, world_size, rank), f"{prefix}/step-2{suffix}", storage_options=options, timeout=60
        )
        out["ok"] = True
    except torchstow.CheckpointException as exc:
        out.update(error=type(exc).__name__, notes=getattr(exc, "__notes__", []))
    except SystemExit as exc:
        os._exit(int(exc.code or 1))
    return out


class _UnsendableManifest(ForwardingStorageWriter):
    """Commits, then leaves in the manifest a value that cannot be sent to the other ranks."""

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.inner.finish(metadata, results)
        metadata.user_metadata = {"not picklable": lambda: None}


def save_with_unsendable_manifest(rank: int, world_size: int, path: str) -> list[str]:
    """Save step 2 at ``path``; the committed manifest cannot travel back. The notes raised."""
    writer = _UnsendableManifest(torchstow.storage_writer(path))
    try:
        torchstow.save(crash_state(2, world_size, rank), storage_writer=writer)
    except torchstow.CheckpointException as exc:
        return list(getattr(exc, "__notes__", []))
    raise AssertionError("the save did not fail")
