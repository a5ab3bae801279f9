"""The wrapper kit passes a correct byte-level wrapper (``xor+``; on S3 in
tests/backends/test_wrapper_backend.py) and catches
each trap of issue 23 in a broken one, with a message naming the rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from torchstow.spi import ByteStore, FileSink, StoreBackend, open_backend
from torchstow.testing import WrapperConformance
from xor_wrapper import XorBackend, XorStore, install


class TestXorOnFile(WrapperConformance):
    scheme = "xor+file"

    @pytest.fixture(autouse=True)
    def _installed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        install(monkeypatch, XorBackend)

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        return {"xor.key": 0x5A}


class LeakyStore(XorStore):
    """The "fix" for lost capabilities: declares that it keeps the bytes, so it forwards them."""

    transforms_bytes = False


class LeakyBackend(XorBackend):
    schemes = ("leaky",)

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return LeakyStore(store, self)


class CopyingStore(XorStore):
    """Transforms what it is given, but its sinks forward copy_from: a local file lands as is."""

    def create(self, name: str) -> FileSink:
        sink = super().create(name)
        sink.copy_from = sink.inner.copy_from  # type: ignore[attr-defined,method-assign]
        return sink


class CopyingBackend(XorBackend):
    schemes = ("copying",)

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return CopyingStore(store, self)


class UntunedBackend(StoreBackend):
    """A wrapper on StoreBackend as the docs once implied: its own default tuning, not the inner's."""

    schemes = ("untuned",)

    def __init__(self, **storage_options: Any) -> None:
        super().__init__()
        self.storage_options = storage_options

    def open_store(self, uri: str) -> ByteStore:
        inner_uri = uri.partition("+")[2]
        backend = open_backend(inner_uri, self.storage_options)
        assert isinstance(backend, StoreBackend)
        return backend.open_store(inner_uri)

    def list_children(self, prefix: str) -> list[str]:
        return []


def _run(kit_test: Callable[..., None], scheme: str, tmp_path: Path, options: dict[str, Any]) -> None:
    """Run one case of the kit on ``scheme``, its fixtures built by hand."""
    kit = type("Kit", (WrapperConformance,), {"scheme": scheme})()
    getattr(kit, kit_test.__name__)(f"{scheme}://{tmp_path}/root", options)


@pytest.mark.parametrize(
    ("backend", "kit_test", "rule"),
    [
        (LeakyBackend, WrapperConformance.test_bytes_at_rest_match_the_declaration, "exactly when the store"),
        (CopyingBackend, WrapperConformance.test_no_capability_leaks, "a sink's copy_from put the file"),
        (UntunedBackend, WrapperConformance.test_tuning_is_inherited, r"writes with \d+ threads.* 3"),
    ],
)
def test_each_trap_is_caught_with_its_rule(
    backend: type[StoreBackend],
    kit_test: Callable[..., None],
    rule: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, backend)
    options = {f"{backend.schemes[0]}.key": 7} if issubclass(backend, XorBackend) else {}
    with pytest.raises(AssertionError, match=f"(?s)rule broken: .*{rule}"):
        _run(kit_test, f"{backend.schemes[0]}+file", tmp_path, options)
