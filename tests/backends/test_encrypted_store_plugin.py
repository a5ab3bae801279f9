"""The ``enc+`` wrapper example (examples/encrypted_store), pip-installed as a third party
would: found through its entry point, passing the kits on file, saving and loading on S3
with no plaintext tensor bytes at rest, and a wrong key a clear error naming the file."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torchstow
from torchstow.cli import main
from torchstow.errors import CheckpointException, CorruptCheckpointError
from torchstow.spi import open_backend
from torchstow.testing import DistributedBackendConformance

from storage_helpers import EXAMPLES, installed_example, s3_options, unique

EXAMPLE = EXAMPLES / "encrypted_store"
KEY = "5a" * 32
OTHER_KEY = "a5" * 32


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example pip-installed into a directory on sys.path for this module's tests only."""
    with installed_example(EXAMPLE, tmp_path_factory.mktemp("enc-plugin"), "torchstow_enc") as target:
        yield target


@pytest.fixture(autouse=True)
def _installed(plugin_path: Path) -> None:
    """Every test here runs with the plugin installed."""


def _example_kits() -> Any:
    spec = importlib.util.spec_from_file_location(
        "torchstow_enc_kits", EXAMPLE / "tests" / "test_enc_conformance.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_kits = _example_kits()
TestEncPluginConformance = _kits.TestEncStore
TestEncPluginByteStore = _kits.TestEncByteStore
TestEncPluginWrapper = _kits.TestEncWrapper
TestEncPluginDistributed = pytest.mark.slow(_kits.TestEncDistributed)


@pytest.mark.slow
class TestEncOnS3Distributed(DistributedBackendConformance):
    """Two ranks saving and loading one encrypted checkpoint on S3 (moto)."""

    scheme = "enc+s3"

    @pytest.fixture
    def root_uri(self, s3_bucket: str) -> str:
        return f"enc+s3://{s3_bucket}/{unique('enc-dist')}"

    @pytest.fixture
    def storage_options(self, s3_endpoint: str) -> dict[str, Any]:
        return s3_options(s3_endpoint, **{"enc.key": KEY})


# A run of float32 values no random bytes contain: found at rest only if stored in plaintext.
PATTERN_VALUES = torch.arange(1000, 1064, dtype=torch.float32)


def _state() -> dict[str, Any]:
    return {"w": torch.cat([torch.randn(300_000), PATTERN_VALUES]), "b": PATTERN_VALUES.clone(), "step": 3}


def _raw_files(root: str, options: dict[str, Any], name: str) -> dict[str, bytes]:
    """Every file of the checkpoint ``name`` as it lies at rest, read through the plain backend."""
    store = open_backend(root, options).open_store(f"{root}/{name}")  # type: ignore[attr-defined]
    return {f: store.read_file(f) for f in store.list_files()}


@pytest.mark.parametrize("medium", ["file", "s3"])
def test_saves_and_loads_with_no_plaintext_at_rest(
    medium: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if medium == "s3":
        root = f"s3://{request.getfixturevalue('s3_bucket')}/{unique('enc')}"
        options = s3_options(request.getfixturevalue("s3_endpoint"))
    else:
        root, options = f"file://{tmp_path}", {}
    uri = f"enc+{root}/step-3"
    state = _state()
    torchstow.save(state, uri, storage_options={**options, "enc.key": KEY})
    loaded = torchstow.read(uri, storage_options={**options, "enc.key": KEY})
    assert (
        torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"]) and loaded["step"] == 3
    )
    part = torchstow.read(uri, keys=["b"], storage_options={**options, "enc.key": KEY})  # a ranged read
    assert torch.equal(part["b"], PATTERN_VALUES)
    raw = _raw_files(root, options, "step-3")
    pattern = PATTERN_VALUES[:8].numpy().tobytes()
    assert any(name.endswith(".bin") for name in raw) and not any(pattern in data for data in raw.values())
    # read without the wrapper, the same checkpoint's data fails its checksums
    with pytest.raises(CheckpointException, match=r"ChecksumMismatchError|CorruptCheckpointError"):
        torchstow.read(f"{root}/step-3", storage_options=options)


def test_a_wrong_key_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    uri = f"enc+file://{tmp_path}/step-1"
    torchstow.save(_state(), uri, storage_options={"enc.key": KEY})
    with pytest.raises(CheckpointException) as caught:
        torchstow.read(uri, storage_options={"enc.key": OTHER_KEY})
    (failure,) = [exc for exc, _ in caught.value.failures.values()]
    assert isinstance(failure, CorruptCheckpointError)
    assert f"{tmp_path}/step-1/data-" in str(failure) and "wrong enc.key" in str(failure)
    assert OTHER_KEY not in str(caught.value)


def test_the_key_comes_from_the_environment_and_manifest_verbs_need_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"enc+file://{tmp_path}/run/step-1"
    with pytest.raises(TypeError, match=r"enc\.key.*TORCHSTOW_ENC_KEY"):
        torchstow.save(_state(), uri)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("TORCHSTOW_ENC_KEY", KEY)
    torchstow.save(_state(), uri)
    assert main(["verify", uri]) == 0
    monkeypatch.delenv("TORCHSTOW_ENC_KEY")
    assert torchstow.info(uri).num_entries == 3  # read from the plaintext manifest
    assert main(["ls", f"enc+file://{tmp_path}/run"]) == 0 and main(["du", f"enc+file://{tmp_path}/run"]) == 0
    assert main(["verify", uri, "-o", f"enc.key={KEY}"]) == 0
    capsys.readouterr()
    assert main(["verify", uri, "-o", f"enc.key={OTHER_KEY}"]) != 0
    assert "data-" in (shown := capsys.readouterr().out) and "wrong enc.key" in shown
