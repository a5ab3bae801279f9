"""The wrapper kit: the rules of a byte-level wrapper (``<wrapper>+<inner-uri>``), checked
against the inner backend it wraps.

Subclass :class:`WrapperConformance` and set ``scheme`` to the compound scheme under
test (``enc+file``, ``enc+s3``): the kit saves through it and compares what lies at rest,
read through the inner backend (the URI after the first ``+``, with the options not
written ``<wrapper>.<name>``). It checks that:

- the bytes at rest differ from what torchstow wrote exactly when the wrapper's store
  declares ``transforms_bytes = True``;
- a transforming wrapper leaks no capability of the inner store (``local_path``,
  ``adopt``, ``file_sizes``, a sink's ``copy_from``);
- writers and readers use the inner backend's thread count and checksum setting;
- ``faulty+`` composes with it (``faulty+enc+file://...``).
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch

import torchstow
from torchstow.errors import CheckpointException, CheckpointNotFoundError
from torchstow.format.files import is_manifest_file
from torchstow.spi import ByteStore, StoreBackend, open_backend
from torchstow.testing._rules import rule
from torchstow.testing.base import ConformanceBase
from torchstow.testing.compare import assert_same_state

__all__ = ["WrapperConformance"]

# float32 values whose bytes no random data contains: found at rest only if stored as written
_PATTERN = torch.arange(7001, 7257, dtype=torch.float32)


def _state() -> dict[str, Any]:
    return {"w": torch.cat([torch.randn(4096), _PATTERN]), "b": _PATTERN.clone(), "step": 11}


def _tuning(obj: Any) -> tuple[int, bool | None]:
    """The thread count (and checksum setting) of a layout writer or reader, through wrappers."""
    while not hasattr(obj, "thread_count") and hasattr(obj, "inner"):
        obj = obj.inner
    return obj.thread_count, getattr(obj, "verify_checksums", None)


class WrapperConformance(ConformanceBase):
    """Conformance tests for a byte-level wrapper plugin; subclass and set ``scheme``
    to the compound scheme (``"enc+file"``)."""

    def split(self, uri: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The inner URI of ``uri`` and the storage options its backend takes."""
        wrapper, _, inner = uri.partition("+")
        return inner, {k: v for k, v in options.items() if not k.startswith(f"{wrapper}.")}

    def stores(self, uri: str, options: dict[str, Any]) -> tuple[ByteStore, ByteStore]:
        """The wrapper's store at ``uri`` and the inner backend's store of the same location."""
        backend = open_backend(uri, options)
        inner_uri, inner_options = self.split(uri, options)
        inner = open_backend(inner_uri, inner_options)
        if not (isinstance(backend, StoreBackend) and isinstance(inner, StoreBackend)):
            pytest.skip(f"{self.scheme} is not a byte-level wrapper around a byte store")
        return backend.open_store(uri), inner.open_store(inner_uri)

    def saved(self, root_uri: str, options: dict[str, Any], name: str = "ckpt") -> str:
        uri = self.uri(root_uri, name)
        torchstow.save(_state(), uri, storage_options=options)
        return uri

    @rule(
        "the bytes at rest differ from what torchstow wrote exactly when the store declares transforms_bytes",
        "set transforms_bytes = True on a ForwardingByteStore that changes bytes (encryption, compression); "
        "leave it False only when every file at rest is the file torchstow wrote",
    )
    def test_bytes_at_rest_match_the_declaration(
        self, root_uri: str, storage_options: dict[str, Any]
    ) -> None:
        uri = self.saved(root_uri, storage_options)
        shown, at_rest = self.stores(uri, storage_options)
        transforms = bool(getattr(shown, "transforms_bytes", False))
        names = [n for n in at_rest.list_files() if not is_manifest_file(n)]
        assert names, f"no data file at rest under {at_rest.location}"
        differ = [n for n in names if at_rest.read_file(n) != shown.read_file(n)]
        if transforms:
            assert differ, f"{type(shown).__name__} declares transforms_bytes but stores files as written"
        else:
            assert not differ, (
                f"{type(shown).__name__} stores {differ} changed but declares transforms_bytes = False: "
                "mapped reads would hand the stored bytes to tensors, incremental saves would share them"
            )

    @rule(
        "a wrapper that transforms bytes leaks no capability of the store it wraps",
        "subclass ForwardingByteStore with transforms_bytes = True and do not override local_path, adopt, "
        "can_adopt or file_sizes; a sink that transforms must not forward copy_from",
    )
    def test_no_capability_leaks(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.saved(root_uri, storage_options)
        shown, at_rest = self.stores(uri, storage_options)
        if not getattr(shown, "transforms_bytes", False):
            pytest.skip(f"{type(shown).__name__} keeps the bytes: every capability may be forwarded")
        name = next(n for n in at_rest.list_files() if not is_manifest_file(n))  # a data file
        assert shown.local_path(name) is None, "local_path maps the stored bytes, not what torchstow wrote"
        assert shown.file_sizes() is None, "file_sizes reports the sizes at rest, not what torchstow wrote"
        assert not shown.can_adopt(), "can_adopt: an incremental save would share stored files"
        other, _ = self.stores(self.uri(root_uri, "other"), storage_options)
        other.prepare()
        assert not other.adopt(shown, name), "adopt shared a stored file with another checkpoint"
        # a sink's copy_from must not put a local file at rest untransformed
        plain = bytes(range(256)) * 64
        store, raw = self.stores(self.uri(root_uri, "copy"), storage_options)
        store.prepare()
        with tempfile.NamedTemporaryFile() as source:
            source.write(plain)
            source.flush()
            sink = store.create(name)
            if not sink.copy_from(source.name, len(plain)):
                sink.write([plain])
            sink.close()
        assert raw.read_file(name) != plain, "a sink's copy_from put the file at rest untransformed"
        assert store.read_file(name) == plain

    @rule(
        "a wrapper's writer and reader use the inner backend's thread count and checksum setting",
        "subclass torchstow.spi.WrapperBackend, or override StoreBackend.tuned_by(uri) to return the inner "
        "backend (its tuned_by(inner_uri)); pass every option that is not the wrapper's to the inner backend",
    )
    def test_tuning_is_inherited(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "tuned")
        inner_uri, inner_options = self.split(uri, storage_options)
        for extra in ({}, {"thread_count": 3, "verify_checksums": False}):
            wrapped = open_backend(uri, {**storage_options, **extra})
            inner = open_backend(inner_uri, {**inner_options, **extra})
            expected = _tuning(inner.storage_writer(inner_uri))[0]
            assert _tuning(wrapped.storage_writer(uri))[0] == expected, (
                f"with options {extra}: the wrapper writes with {_tuning(wrapped.storage_writer(uri))[0]} "
                f"threads, the inner backend with {expected}"
            )
            got, want = _tuning(wrapped.storage_reader(uri)), _tuning(inner.storage_reader(inner_uri))
            assert got == want, f"with options {extra}: reader (threads, verify) {got}, the inner's {want}"

    @rule(
        "faulty+ composes with the wrapper: a fault commits nothing, no fault round-trips",
        "resolve the inner URI with open_backend and take the options faulty+ passes on",
    )
    def test_faulty_composes(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "faulty")
        with pytest.raises(CheckpointException, match="injected fault in finish"):
            torchstow.save(_state(), f"faulty+{uri}?fail=finish", storage_options=storage_options)
        with pytest.raises(CheckpointNotFoundError):
            torchstow.info(uri, storage_options=storage_options)
        state = _state()
        torchstow.save(state, f"faulty+{uri}", storage_options=storage_options)
        assert_same_state(torchstow.read(uri, storage_options=storage_options), state)
        assert_same_state(torchstow.read(f"faulty+{uri}", storage_options=storage_options), state)
