"""A training script's SIGTERM handler that raises to stop, while the manifest is being
published: the save (or copy) fails with that exception (never swallowed because the
manifest landed), and a manifest that landed keeps every file it names, even one that
lands after the save raised (a store uploading on another thread, interrupted by a
handler's ``OSError``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.format.codec import peek_manifest

# Saves in a process of its own whose SIGTERM handler raises Preempted; the local store's
# manifest publish sends the process SIGTERM before or after the manifest lands. Or
# ("uploading") the publish uploads on a thread of its own, as fsspec's event loop does,
# and waits for it; SIGALRM's handler raises TimeoutError (an OSError) meanwhile, and the
# upload lands only after the save raised. One JSON line per save: what the save did
# (returned, or the failures' exception types).
_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, threading
    import torch, torchstow
    from torchstow.backends.filesystem import LocalFileStore

    class Preempted(Exception):
        pass

    def on_term(signum, frame):
        raise Preempted("SIGTERM: stop training")

    def on_alarm(signum, frame):
        raise TimeoutError("SIGALRM: the step ran too long")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, on_alarm)
    when = {}
    gate = threading.Event()
    uploads = []

    def interrupted(original):
        def publish(self, name, data):
            if name == "manifest.json" and when.get("now") == "uploading":
                upload = threading.Thread(target=lambda: (gate.wait(), original(self, name, data)))
                upload.start()
                uploads.append(upload)
                os.kill(os.getpid(), signal.SIGALRM)
                upload.join()
                return
            if name == "manifest.json" and when.get("now") == "before":
                os.kill(os.getpid(), signal.SIGTERM)
            original(self, name, data)
            if name == "manifest.json" and when.get("now") == "after":
                os.kill(os.getpid(), signal.SIGTERM)
        return publish

    LocalFileStore.publish = interrupted(LocalFileStore.publish)
    LocalFileStore.publish_new = interrupted(LocalFileStore.publish_new)
    for uri, moment, overwrite, op in json.loads(sys.argv[1]):
        if overwrite:
            torchstow.save({"w": torch.zeros(1024)}, uri)
        if op == "copy":
            torchstow.save({"w": torch.arange(1024.0)}, uri + "-src")
        when["now"] = moment
        try:
            if op == "copy":
                torchstow.copy(uri + "-src", uri, overwrite=overwrite)
            else:
                torchstow.save({"w": torch.arange(1024.0)}, uri, overwrite=overwrite)
            outcome = {"returned": True}
        except torchstow.CheckpointException as exc:
            failed = sorted(type(e).__name__ for e, _ in exc.failures.values())
            outcome = {"failed": failed, "notes": getattr(exc, "__notes__", [])}
        except (Preempted, TimeoutError) as exc:
            outcome = {"failed": [type(exc).__name__]}
        when["now"] = None
        gate.set()
        for upload in uploads:
            upload.join()
        print(json.dumps(outcome), flush=True)
    """
)


def _files_listed(uri: Path) -> set[str]:
    """The data files and the chunk table the committed manifest at ``uri`` names."""
    data = (uri / "manifest.json").read_bytes()
    return set(json.loads(data)["files"]) | {peek_manifest(data).chunk_table or "manifest.json"}


def test_a_sigterm_handlers_exception_during_publish_fails_the_save_and_keeps_committed_data(
    tmp_path: Path,
) -> None:
    cases = [
        (str(tmp_path / "landed"), "after", False, "save"),
        (str(tmp_path / "landed-over"), "after", True, "save"),
        (str(tmp_path / "not-landed-over"), "before", True, "save"),
        (str(tmp_path / "copy-landed-over"), "after", True, "copy"),
        (str(tmp_path / "landed-later"), "uploading", False, "save"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    outcomes = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(outcomes) == len(cases), run.stdout
    for (uri, moment, _, _), outcome in zip(cases, outcomes, strict=True):
        # the handler's exception is the save's failure, whether or not the manifest landed
        raised = "TimeoutError" if moment == "uploading" else "Preempted"
        assert outcome.get("failed") == [raised], (moment, outcome)
        assert _files_listed(Path(uri)) <= set(os.listdir(uri)), moment  # no named file deleted
        # landed (after: at once; uploading: after the save raised) it loads; else the old one. The
        # store's call goes on after a handler's exception, so "before" may have landed too.
        loaded = torchstow.read(uri)["w"]
        if moment == "before":
            assert torch.equal(loaded, torch.zeros(1024)) or torch.equal(loaded, torch.arange(1024.0))
        else:
            assert torch.equal(loaded, torch.arange(1024.0)), moment
    assert any("did commit" in note for note in outcomes[0]["notes"]), outcomes[0]  # and says so
    # uploading: not read back as "not landed" (which removed the files it names), but unknown
    assert any("unknown" in note for note in outcomes[-1]["notes"]), outcomes[-1]


class _PreemptedError(Exception):
    """What the test's SIGALRM handler raises to stop a save."""


def test_a_later_save_is_never_replaced_by_an_interrupted_publish_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler's exception stops the save on the main thread, but its manifest's
    publish goes on in the background; the user saves again to the same location, and that
    save returns. The checkpoint there must stay the later save's (before: the interrupted
    publish landed after it, and the location silently went back to the interrupted save's
    manifest). The interrupted publish is let go once the later manifest landed, or after
    a second at most (as the later save, waiting for it, never publishes until it is done)."""
    from torchstow.backends.filesystem import LocalFileStore
    from torchstow.format.files import MANIFEST

    uri = str(tmp_path / "latest")
    torchstow.save({"w": torch.zeros(64)}, uri)
    original = LocalFileStore.publish
    later_landed = threading.Event()
    interrupted: list[threading.Thread] = []

    def publish(self: LocalFileStore, name: str, data: bytes) -> None:
        if name != MANIFEST:
            original(self, name, data)
        elif not interrupted:  # the first save's manifest: a handler raises, the publish stalls
            interrupted.append(threading.current_thread())
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGALRM)
            later_landed.wait(1.0)
            original(self, name, data)
        else:
            original(self, name, data)
            later_landed.set()

    def on_alarm(signum: int, frame: Any) -> None:
        raise _PreemptedError("SIGALRM: stop")

    monkeypatch.setattr(LocalFileStore, "publish", publish)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises(torchstow.CheckpointException):
            torchstow.save({"w": torch.ones(64)}, uri, overwrite=True)
        later = torchstow.save({"w": torch.full((64,), 2.0)}, uri, overwrite=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    interrupted[0].join()
    assert peek_manifest((Path(uri) / MANIFEST).read_bytes()).save_id == later.save_id
    assert torch.equal(torchstow.read(uri)["w"], torch.full((64,), 2.0))


def test_a_save_commits_where_python_refuses_the_publish_its_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the main thread the manifest is published from a thread of its own; Python 3.12+
    refuses to start threads at interpreter shutdown (a save from an atexit handler), with
    the RuntimeError simulated here. The save must commit as it did before that thread
    (before: the refusal failed it, the commit's outcome unknown)."""
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "torchstow-commit":
            raise RuntimeError("can't create new thread at interpreter shutdown")
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    uri = str(tmp_path / "at-exit")
    result = torchstow.save({"w": torch.arange(64.0)}, uri)
    torchstow.save({"w": torch.ones(64)}, uri, overwrite=True)  # and a later one to the same place
    assert result.save_id is not None
    assert torch.equal(torchstow.read(uri)["w"], torch.ones(64))


class _HandlerError(RuntimeError):
    """What the test's SIGALRM handler raises: a RuntimeError, as Python's refusal of a thread is."""


@pytest.mark.parametrize("begun", [False, True], ids=["before-the-thread-began", "after"])
def test_a_handlers_runtime_error_inside_thread_start_is_not_taken_for_pythons_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, begun: bool
) -> None:
    """A signal handler raises RuntimeError while the publish's thread is being started,
    before or after that thread began. That is the handler's exception, not Python refusing
    the thread: the save fails with it (before: the publish ran on the main thread instead,
    the handler's exception was lost and the save returned as committed). A publish that
    began goes on and lands; one that did not leaves no manifest."""
    original = threading.Thread.start
    started: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        if self.name != "torchstow-commit":
            original(self)
            return
        if begun:
            original(self)
            started.append(self)
        signal.raise_signal(signal.SIGALRM)  # the handler runs here, inside start()

    def on_alarm(signum: int, frame: Any) -> None:
        raise _HandlerError("SIGALRM: stop")

    monkeypatch.setattr(threading.Thread, "start", start)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    uri = tmp_path / "ckpt"
    try:
        with pytest.raises(torchstow.CheckpointException) as failed:
            torchstow.save({"w": torch.arange(64.0)}, str(uri))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert [type(e) for e, _ in failed.value.failures.values()] == [_HandlerError]
    for thread in started:
        thread.join()
    if begun:
        assert torch.equal(torchstow.read(str(uri))["w"], torch.arange(64.0))
    else:
        assert not (uri / "manifest.json").exists()
