"""The fault-injecting backend: its URI grammar, pass-through, and each fault mode
(kill, exit and hang are exercised with real processes in tests/distributed)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest
import torch

import torchstow
from torchstow.backends.faulty import FaultyBackend, FaultyReader, FaultyWriter, parse_faulty_uri
from torchstow.plugins.manager import default_registry


def _state() -> dict[str, object]:
    return {"w": torch.arange(12.0).reshape(3, 4), "meta": {"epoch": 3, "pair": (1, 2)}}


def test_registered_through_its_entry_point() -> None:
    entry = default_registry().resolve("faulty+file:///tmp/x?fail=finish")
    assert entry.backend is FaultyBackend
    assert entry.plugin == "faulty"


def test_parses_the_fault() -> None:
    inner, spec = parse_faulty_uri(
        "faulty+file:///tmp/c?fail=write_data,finish&ranks=1,3&mode=raise&exc=OSError"
    )
    assert inner == "file:///tmp/c"
    assert spec.steps == {"write_data", "finish"}
    assert spec.ranks == {1, 3}
    assert spec.exception is OSError
    inner, spec = parse_faulty_uri("faulty+file:///tmp/c")
    assert (inner, spec.steps, spec.ranks, spec.mode) == ("file:///tmp/c", frozenset(), None, "raise")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("faulty+file:///c?fail=write_data&when=now", "unknown parameter 'when'"),
        ("faulty+file:///c?fail=write_everything", "unknown step(s) ['write_everything']"),
        ("faulty+file:///c?fail=finish&mode=explode", "unknown mode 'explode'"),
        ("faulty+file:///c?fail=finish&mode=future", "mode=future applies to write_data and read_data only"),
        ("faulty+file:///c?fail=read_data&mode=corrupt", "mode=corrupt applies to fail=write_data only"),
        ("faulty+file:///c?fail=finish&ranks=one", "ranks must be comma-separated integers"),
        ("faulty+file:///c?fail=finish&exc=print", "is not a built-in or torchstow exception class"),
        ("faulty+file:///c?fail=finish&exc=CheckpointException", "is not a built-in or torchstow exception"),
        ("faulty+file:///c?fail=finish&seconds=soon", "could not convert string to float"),
        ("faulty+/plain/path?fail=finish", "must be a URI with a scheme"),
    ],
)
def test_rejects_a_bad_uri_clearly(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_faulty_uri(uri)


def test_passes_everything_through_without_a_fault(tmp_path: Path) -> None:
    uri = f"faulty+file://{tmp_path}/step-1"
    assert isinstance(torchstow.storage_writer(uri), FaultyWriter)
    assert isinstance(torchstow.storage_reader(uri), FaultyReader)
    torchstow.save(_state(), uri, metadata={"note": "hi"})
    target = {"w": torch.zeros(3, 4), "meta": {"epoch": 0, "pair": None}}
    torchstow.load(target, f"{uri}?fail=read_data&ranks=5")  # a fault for another rank
    assert torch.equal(target["w"], torch.arange(12.0).reshape(3, 4))
    assert target["meta"] == {"epoch": 3, "pair": (1, 2)}
    assert torchstow.info(uri).user_metadata == {"note": "hi"}
    prefix = f"faulty+file://{tmp_path}?fail=read_data"
    assert torchstow.latest(prefix) == f"faulty+file://{tmp_path}/step-1?fail=read_data"
    torchstow.delete(uri)
    assert torchstow.latest(str(tmp_path)) is None


def test_storage_options_reach_the_inner_backend(tmp_path: Path) -> None:
    backend = default_registry().backend_for("faulty+file:///x", {"fsync": False})
    writer = backend.storage_writer(f"faulty+file://{tmp_path}/c")
    assert writer.inner.store.fsync is False  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="does not take the storage options"):
        torchstow.save(_state(), f"faulty+file://{tmp_path}/d", storage_options={"colour": "red"})


@pytest.mark.parametrize("exc", [ValueError, OSError, RuntimeError, torchstow.CheckpointNotFoundError])
def test_raise_mode_raises_the_chosen_class(tmp_path: Path, exc: type[Exception]) -> None:
    uri = f"faulty+file://{tmp_path}/c?fail=prepare_local_plan&exc={exc.__name__}"
    with pytest.raises(torchstow.CheckpointException) as info:
        torchstow.save(_state(), uri)
    error, stack = info.value.failures[0]
    assert type(error) is exc
    assert str(error).strip("'") == f"injected fault in prepare_local_plan on rank 0 (file://{tmp_path}/c)"
    assert stack[-1].name == "_inject"


def test_future_mode_returns_a_failed_future(tmp_path: Path) -> None:
    torchstow.save(_state(), tmp_path / "c")
    reader = torchstow.storage_reader(f"faulty+file://{tmp_path}/c?fail=read_data&mode=future&exc=OSError")
    future = reader.read_data(None, None)  # type: ignore[arg-type]  # the fault comes before any use
    assert isinstance(future, concurrent.futures.Future)
    assert isinstance(future.exception(), OSError)


def test_delay_mode_delays_then_passes_through(tmp_path: Path) -> None:
    uri = f"faulty+file://{tmp_path}/c?fail=write_data&mode=delay&seconds=0.2"
    start = time.monotonic()
    torchstow.save(_state(), uri)
    assert time.monotonic() - start >= 0.2
    assert torch.equal(torchstow.read(tmp_path / "c")["w"], torch.arange(12.0).reshape(3, 4))


def test_corrupt_mode_flips_bytes_after_checksumming(tmp_path: Path) -> None:
    torchstow.save(_state(), f"faulty+file://{tmp_path}/c?fail=write_data&mode=corrupt")
    with pytest.raises(torchstow.ChecksumMismatchError, match="checksum mismatch in 'w'"):
        torchstow.read(tmp_path / "c")


def test_corrupt_mode_only_on_the_chosen_ranks(tmp_path: Path) -> None:
    torchstow.save(_state(), f"faulty+file://{tmp_path}/c?fail=write_data&mode=corrupt&ranks=1")
    assert torch.equal(torchstow.read(tmp_path / "c")["w"], torch.arange(12.0).reshape(3, 4))
