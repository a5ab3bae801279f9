"""A byte-level wrapper built on ``WrapperBackend`` (as docs/plugins.md shows): it inherits
the inner backend's tuning, its own options are namespaced ``<scheme>.<name>``, and an
option it needs only for data is not demanded by what reads only manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.backends.fsspec.store import THREADS
from torchstow.cli import main
from torchstow.core.layout.location import default_thread_count
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import CheckpointException
from torchstow.plugins.resolve import backend_at, route_options
from torchstow.testing import WrapperConformance
from xor_wrapper import XorBackend, install

from storage_helpers import s3_options, unique


@pytest.fixture(autouse=True)
def xor_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, XorBackend)


@pytest.fixture
def s3(s3_endpoint: str, s3_bucket: str) -> tuple[str, dict[str, Any]]:
    return f"s3://{s3_bucket}/{unique('wrap')}", s3_options(s3_endpoint)


def _writer_threads(uri: str, options: dict[str, Any]) -> int:
    writer: Any = torchstow.api.storage_writer(uri, storage_options=options)
    while not hasattr(writer, "thread_count"):  # through faulty+'s writer
        writer = writer.inner
    return int(writer.thread_count)


def test_a_wrapper_uses_the_inner_backends_thread_count(
    tmp_path: Path, s3: tuple[str, dict[str, Any]]
) -> None:
    root, options = s3
    xor = {"xor.key": 7}
    assert _writer_threads(f"xor+{root}/c", {**options, **xor}) == THREADS != default_thread_count()
    assert _writer_threads(f"xor+file://{tmp_path}/c", xor) == default_thread_count()
    assert _writer_threads(f"xor+file://{tmp_path}/c", {**xor, "thread_count": 3}) == 3
    corrupting = f"faulty+xor+{root}/c?fail=write_data&mode=corrupt"  # faulty+ wraps the wrapper's store
    assert _writer_threads(corrupting, {**options, **xor}) == THREADS
    reader = torchstow.api.storage_reader(  # type: ignore[attr-defined]
        f"xor+{root}/c", storage_options={**options, **xor, "verify_checksums": False}
    )
    assert (reader.thread_count, reader.verify_checksums) == (THREADS, False)


def test_wrapper_options_never_collide_with_the_inner_ones(s3: tuple[str, dict[str, Any]]) -> None:
    root, options = s3  # s3fs's own option "key" (the access key id) is among these
    uri = f"xor+{root}/c"
    torchstow.save({"w": torch.arange(8)}, uri, storage_options={**options, "xor.key": 0x5A})
    loaded = torchstow.read(uri, storage_options={**options, "xor.key": 0x5A})
    assert torch.equal(loaded["w"], torch.arange(8))
    with pytest.raises(TypeError, match=r"\['xor.kye'\].*endpoint_url.*part_size.*xor\.key"):
        torchstow.read(uri, storage_options={**options, "xor.kye": 1})
    # cp's -o routing: the S3 credentials go to both sides, the wrapper's key to its side only
    src, dst = route_options(uri, f"{root}/plain", {**options, "xor.key": 1})
    assert src == {**options, "xor.key": 1} and dst == options


def test_a_data_only_option_is_not_demanded_by_manifest_verbs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"xor+file://{tmp_path}/run/step-1"
    torchstow.save({"w": torch.arange(8)}, uri, storage_options={"xor.key": 0x5A})
    assert torchstow.info(uri).nbytes == 64
    assert [c.uri for c in torchstow.list_checkpoints(f"xor+file://{tmp_path}/run")] == [uri]
    assert main(["ls", f"xor+file://{tmp_path}/run"]) == 0 and main(["info", uri]) == 0
    with pytest.raises(CheckpointException, match=r"needs the storage option xor\.key to read or write data"):
        torchstow.read(uri)
    with pytest.raises(TypeError, match=r"needs the storage option xor\.key to read or write data"):
        torchstow.save({}, f"xor+file://{tmp_path}/run/step-2")
    capsys.readouterr()
    assert main(["verify", uri]) != 0 and "-o xor.key=VALUE" in capsys.readouterr().err
    assert main(["verify", uri, "-o", "xor.key=90"]) == 0


@pytest.mark.parametrize("chain", ["xor+xor+file", "xor+faulty+xor+file"])
def test_a_wrapper_applied_twice_is_refused(
    chain: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xor+xor+`` would give every ``xor.*`` option to the outer layer (the inner one
    saving without its key, or with defaults the user never chose): a repeated wrapper is
    refused before anything is written (before: a TypeError asking for the key given)."""
    uri = f"{chain}://{tmp_path}/c"
    with pytest.raises(ValueError, match=r"applies the wrapper xor\+ more than once"):
        torchstow.save({"w": torch.arange(8)}, uri, storage_options={"xor.key": 0x5A})
    assert not (tmp_path / "c").exists()
    assert main(["ls", uri]) != 0 and "more than once" in capsys.readouterr().err


def test_faulty_takes_its_parameters_as_namespaced_options(
    tmp_path: Path, s3: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, options = s3
    uri = f"faulty+{root}/c"
    with pytest.raises(CheckpointException, match="injected fault in finish"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={**options, "faulty.fail": "finish"})
    with pytest.raises(TypeError, match=r"\['faulty.fial'\].*faulty\.fail"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={**options, "faulty.fial": "finish"})
    with pytest.raises(TypeError, match=r"\['endpoint'\].*endpoint_url.*faulty\.fail"):
        torchstow.save({"w": torch.ones(2)}, uri, storage_options={"endpoint": "x"})
    # cp's -o: s3fs's "key" reaches the wrapped S3 side too, the fault only the faulty side
    torchstow.save({"w": torch.ones(2)}, f"{root}/src", storage_options=options)
    flags = [arg for name, value in options.items() for arg in ("-o", f"{name}={value}")]
    assert main(["cp", f"{root}/src", uri, *flags, "-o", "faulty.fail=finish"]) != 0
    assert "injected fault in finish" in capsys.readouterr().err
    assert main(["cp", f"{root}/src", uri, *flags]) == 0
    assert torch.equal(torchstow.read(uri, storage_options=options)["w"], torch.ones(2))


class TestXorKitOnS3(WrapperConformance):
    """The wrapper kit on S3 (moto): the wrapper's options beside s3fs's own ``key``."""

    scheme = "xor+s3"

    @pytest.fixture
    def root_uri(self, s3_bucket: str) -> str:
        return f"xor+s3://{s3_bucket}/{unique('kit')}"

    @pytest.fixture
    def storage_options(self, s3_endpoint: str) -> dict[str, Any]:
        return s3_options(s3_endpoint, **{"xor.key": 0x5A})


@pytest.mark.parametrize("where", ["file", "s3"])
def test_gc_through_a_transforming_wrapper_dates_the_inner_files(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root, options = (f"file://{tmp_path}", {}) if where == "file" else request.getfixturevalue("s3")
    options = {**options, "xor.key": 0x5A}
    prefix = f"xor+{root}/run"
    torchstow.save({"w": torch.arange(8)}, f"{prefix}/step-1", storage_options=options)
    debris = "data-aaaaaaaaaaaa-0-0.bin"  # what a killed save left beside the committed one
    plain = {k: v for k, v in options.items() if k != "xor.key"}
    text, backend = backend_at(f"{root}/run/step-1", plain)
    assert isinstance(backend, StoreBackend)
    sink = backend.open_store(text).create(debris)
    sink.write([b"x" * 100])
    sink.close()
    report = torchstow.gc(prefix, older_than=0, storage_options=options)
    assert [r.split("://")[-1] for r in report.removed] == [f"{root}/run/step-1/{debris}".split("://")[-1]]
    assert torch.equal(torchstow.read(f"{prefix}/step-1", storage_options=options)["w"], torch.arange(8))
