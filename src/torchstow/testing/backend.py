"""The end-to-end conformance kit: saves, loads, lists, overwrites, damages and
deletes checkpoints through a backend's scheme, with torchstow's public calls.

Subclass :class:`BackendConformance` in a test module and name the scheme::

    from torchstow.testing import BackendConformance

    class TestMyStore(BackendConformance):
        scheme = "mystore"

The tests run under ``mystore://<a fresh temporary path>``. Override the
fixtures to change that: ``root_uri`` (a fresh prefix per test),
``storage_options`` (passed to every call) and ``open_byte_store`` (raw access
to a checkpoint's files, for the damage tests). Capability flags are class
attributes: ``byte_access`` (False skips the tests that damage files directly),
``concurrent_saves`` (False skips saving several checkpoints at once) and
``exclusive_commits`` (False skips the race of two saves creating one checkpoint).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch

import torchstow
import torchstow.planning
from torchstow import (
    CheckpointException,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    Metadata,
)
from torchstow.errors import SaveInFlightError
from torchstow.spi import (
    MANIFEST,
    ByteStore,
    ForwardingStorageWriter,
    StoreBackend,
    WriteResult,
    open_backend,
)
from torchstow.testing._internals import StorageInfo, is_chunk_table, scheme_of
from torchstow.testing._rules import rule
from torchstow.testing.base import ConformanceBase
from torchstow.testing.compare import assert_same_state
from torchstow.testing.region_planner import RegionLoadPlanner
from torchstow.testing.states import every_dtype_state_dict, zeros_like_state

__all__ = ["BackendConformance"]


class _CrashBeforeCommit(ForwardingStorageWriter):
    """A writer that writes every byte but dies before publishing the manifest
    (a crashed process cleans nothing up, so neither does this writer)."""

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        raise RuntimeError("simulated crash before the commit")

    def abort(self) -> None:
        pass


class BackendConformance(ConformanceBase):
    """End-to-end conformance tests for a torchstow backend; subclass and set ``scheme``."""

    byte_access: ClassVar[bool] = True
    concurrent_saves: ClassVar[bool] = True

    # -- fixtures a backend overrides ------------------------------------------------

    @pytest.fixture
    def open_byte_store(self, storage_options: dict[str, Any]) -> Callable[[str], ByteStore]:
        """Raw access to the files of the checkpoint at a URI.

        The default serves store backends, and wrapper schemes ``a+b://...``
        (a wrapper over the ``b://...`` store, query string dropped).
        """

        def open_store(uri: str) -> ByteStore:
            backend = open_backend(uri, storage_options)
            if not isinstance(backend, StoreBackend) and "+" in scheme_of(uri):
                uri = uri.split("+", 1)[1].split("?", 1)[0]
                backend = open_backend(uri)
            if not isinstance(backend, StoreBackend):
                pytest.fail(
                    f"{type(backend).__name__} is not a byte store: override open_byte_store "
                    "or set byte_access = False"
                )
            return backend.open_store(uri)

        return open_store

    # -- helpers -------------------------------------------------------------------

    def _needs_bytes(self) -> None:
        if not self.byte_access:
            pytest.skip(f"{type(self).__name__} declares no byte-level access (byte_access = False)")

    @staticmethod
    def _location(uri: str, key: str, options: dict[str, Any]) -> StorageInfo:
        metadata = torchstow.storage_reader(uri, storage_options=options).read_metadata()
        for index, info in metadata.storage_data.items():
            if index.fqn == key:
                assert isinstance(info, StorageInfo)
                return info
        raise AssertionError(f"{key} has no data location in {uri}")

    @staticmethod
    def _rewrite(store: ByteStore, name: str, data: bytes) -> None:
        store.delete_files([name])
        sink = store.create(name)
        sink.write([data])
        sink.close()

    # -- the tests -----------------------------------------------------------------

    @rule(
        "every tensor dtype saved comes back bit for bit, through load and read, in either manifest "
        "format (version 2's chunk table is a file of its own)",
        "return exactly the bytes written from read_into/read_file, at the offsets asked (the byte-store "
        "kit localises the fault)",
    )
    @pytest.mark.parametrize("format_version", [1, 2])
    def test_round_trip_every_dtype(
        self, root_uri: str, storage_options: dict[str, Any], format_version: int
    ) -> None:
        sd = every_dtype_state_dict()
        uri = self.uri(root_uri, "step-1")
        torchstow.save(sd, uri, storage_options=storage_options, format_version=format_version)
        assert torchstow.info(uri, storage_options=storage_options).format_version == format_version
        target = zeros_like_state(sd)
        torchstow.load(target, uri, storage_options=storage_options)
        assert_same_state(target, sd)
        assert_same_state(torchstow.read(uri, storage_options=storage_options), sd)

    @rule(
        "nested state, non-tensor values and user metadata come back as saved",
        "store the manifest bytes unchanged through publish/publish_new and read_file",
    )
    def test_nested_state_and_objects(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        gen = torch.Generator().manual_seed(1)
        sd = {
            "model": {
                "layers": [{"w": torch.randn(4, 3, generator=gen)}, {"w": torch.randn(2, generator=gen)}]
            },
            "optim": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=gen)}},
                "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], "params": [0], "name": None}],
            },
            "pair": (torch.arange(3), "tag"),
            "step": 7,
            "blob": b"\x00\x01bytes",
            "seen": {1, 2, 3},
            "empty": {},
        }
        uri = self.uri(root_uri, "nested")
        torchstow.save(sd, uri, storage_options=storage_options, metadata={"step": 7, "note": "nested"})
        assert_same_state(torchstow.read(uri, storage_options=storage_options), sd)
        target = zeros_like_state(sd)
        torchstow.load(target, uri, storage_options=storage_options)
        assert_same_state(target["model"], sd["model"])
        assert_same_state(target["optim"], sd["optim"])
        assert torchstow.info(uri, storage_options=storage_options).user_metadata == {
            "step": 7,
            "note": "nested",
        }
        part = torchstow.read(uri, keys=["model"], storage_options=storage_options)
        assert_same_state(part, {"model": sd["model"]})

    @rule(
        "an empty state dict saves and reads back",
        "accept a checkpoint with a manifest and no data files (publish without any create)",
    )
    def test_empty_state_dict(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "empty")
        torchstow.save({}, uri, storage_options=storage_options)
        assert torchstow.read(uri, storage_options=storage_options) == {}

    @rule(
        "regions of stored tensors read back right (what resharded loads do)",
        "fill every (offset, buffer) request of read_into, in any order, from its own offset",
    )
    def test_region_reads(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        gen = torch.Generator().manual_seed(2)
        big = torch.randn(1536, 1024, generator=gen)  # 6 MiB: two checksum blocks
        vec = torch.randn(10_000, generator=gen)
        uri = self.uri(root_uri, "regions")
        torchstow.save({"big": big, "vec": vec}, uri, storage_options=storage_options)
        cases = {
            "rows": ("big", (100, 0), (900, 1024)),
            "columns": ("big", (0, 200), (1536, 500)),
            "block across checksum blocks": ("big", (1000, 100), (300, 200)),
            "tail": ("big", (1535, 1000), (1, 24)),
            "vector slice": ("vec", (1234,), (5000,)),
        }
        for name, (key, offsets, shape) in cases.items():
            target = torch.zeros(shape)
            planner = RegionLoadPlanner({key: (offsets, target)})
            torchstow.load({}, uri, storage_options=storage_options, planner=planner, no_dist=True)
            source = {"big": big, "vec": vec}[key]
            region = source[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]
            assert torch.equal(target, region), f"region {name} differs"

    @rule(
        "a save that never committed is invisible, and delete clears what it left",
        "write the manifest only in publish/publish_new (never through create), and list the data files a "
        "crashed save left",
    )
    def test_incomplete_save_is_invisible(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "step-5")
        writer = _CrashBeforeCommit(torchstow.storage_writer(uri, storage_options=storage_options))
        with pytest.raises(CheckpointException, match="simulated crash"):
            torchstow.save({"x": torch.ones(8)}, storage_writer=writer, no_dist=True)
        with pytest.raises(IncompleteCheckpointError):
            torchstow.info(uri, storage_options=storage_options)
        with pytest.raises(IncompleteCheckpointError):
            torchstow.load({"x": torch.zeros(8)}, uri, storage_options=storage_options)
        assert torchstow.latest(root_uri, storage_options=storage_options) is None
        assert torchstow.list_checkpoints(root_uri, storage_options=storage_options) == []
        # clears the leftovers (young: a save in flight, as far as delete can tell)
        torchstow.delete(uri, storage_options=storage_options, force=True)
        with pytest.raises(CheckpointNotFoundError):
            torchstow.info(uri, storage_options=storage_options)

    @rule(
        "a save that failed while writing commits nothing, and the location stays usable",
        "let FileSink.abort and delete_files remove what was written; raise the medium's error from "
        "write/close",
    )
    def test_failed_write_commits_nothing(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "step-3")

        class Exploding(torchstow.planning.DefaultSavePlanner):
            def resolve_data(self, write_item: Any) -> Any:
                if write_item.index.fqn == "b":
                    raise OSError("the device went away while writing 'b'")
                return super().resolve_data(write_item)

        sd = {"a": torch.ones(1000), "b": torch.ones(1000), "c": torch.ones(1000)}
        with pytest.raises(CheckpointException, match="went away"):
            torchstow.save(sd, uri, storage_options=storage_options, planner=Exploding())
        with pytest.raises((CheckpointNotFoundError, IncompleteCheckpointError)):
            torchstow.info(uri, storage_options=storage_options)
        assert torchstow.latest(root_uri, storage_options=storage_options) is None
        torchstow.save(sd, uri, storage_options=storage_options)  # the location is usable again
        assert_same_state(torchstow.read(uri, storage_options=storage_options), sd)

    @rule(
        "an existing checkpoint is refused unless overwrite=True, and stays valid until the new one commits",
        "make publish atomic (readers see the old manifest or the new one) and publish_new refuse an "
        "existing name with FileExistsError",
    )
    def test_overwrite(
        self, root_uri: str, storage_options: dict[str, Any], open_byte_store: Callable[[str], ByteStore]
    ) -> None:
        uri = self.uri(root_uri, "step-1")
        old = {"w": torch.full((64,), 1.0), "tag": "old"}
        new = {"w": torch.full((64,), 2.0), "tag": "new"}
        torchstow.save(old, uri, storage_options=storage_options)
        replaced = self._data_files(uri, storage_options)
        if self.byte_access:  # the manifest's chunk table goes with it
            replaced |= {n for n in open_byte_store(uri).list_files() if is_chunk_table(n)}
        with pytest.raises(CheckpointExistsError):
            torchstow.save(new, uri, storage_options=storage_options)
        assert_same_state(torchstow.read(uri, storage_options=storage_options), old)
        crashing = _CrashBeforeCommit(
            torchstow.storage_writer(uri, storage_options=storage_options, overwrite=True)
        )
        with pytest.raises(CheckpointException):
            torchstow.save(new, storage_writer=crashing, no_dist=True)
        assert_same_state(torchstow.read(uri, storage_options=storage_options), old)  # old stays valid
        torchstow.save(new, uri, storage_options=storage_options, overwrite=True)
        assert_same_state(torchstow.read(uri, storage_options=storage_options), new)
        if self.byte_access:
            # The replaced checkpoint's files (its chunk table too) are gone; the crashed save's
            # stay (a commit never deletes files no committed manifest lists: they may be a save
            # in flight).
            files = set(open_byte_store(uri).list_files())
            live = self._data_files(uri, storage_options)
            assert MANIFEST in files and live <= files and not replaced & files

    @staticmethod
    def _data_files(uri: str, storage_options: dict[str, Any]) -> set[str]:
        """The data files the committed manifest at ``uri`` lists."""
        metadata = torchstow.storage_reader(uri, storage_options=storage_options).read_metadata()
        return {info.relative_path for info in metadata.storage_data.values()}

    @rule(
        "list_checkpoints/latest find committed checkpoints only, and delete removes one (a crashed "
        "save's young files only with force=True)",
        "list_children returns the locations under a prefix ([] when missing); list_files lists the medium, "
        "delete_files removes the names given",
    )
    def test_list_latest_delete(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        opts = storage_options
        assert torchstow.latest(root_uri, storage_options=opts) is None
        assert torchstow.latest(self.uri(root_uri, "no-such-prefix"), storage_options=opts) is None
        for step in (2, 10, 1):
            sd = {"w": torch.full((16,), float(step))}
            torchstow.save(
                sd, self.uri(root_uri, f"step-{step}"), storage_options=opts, metadata={"step": step}
            )
        writer = _CrashBeforeCommit(
            torchstow.storage_writer(self.uri(root_uri, "step-99"), storage_options=opts)
        )
        with pytest.raises(CheckpointException):
            torchstow.save({"w": torch.ones(16)}, storage_writer=writer, no_dist=True)
        found = torchstow.list_checkpoints(root_uri, storage_options=opts)
        assert [i.uri for i in found] == [self.uri(root_uri, f"step-{s}") for s in (1, 2, 10)]
        assert [i.step for i in found] == [1, 2, 10]
        assert [i.user_metadata for i in found] == [{"step": 1}, {"step": 2}, {"step": 10}]
        assert all(i.nbytes == 64 and i.num_entries == 1 for i in found)
        assert torchstow.latest(root_uri, storage_options=opts) == self.uri(root_uri, "step-10")

        torchstow.delete(self.uri(root_uri, "step-10"), storage_options=opts)
        assert torchstow.latest(root_uri, storage_options=opts) == self.uri(root_uri, "step-2")
        with pytest.raises(CheckpointNotFoundError):
            torchstow.load({"w": torch.zeros(16)}, self.uri(root_uri, "step-10"), storage_options=opts)
        with pytest.raises(CheckpointNotFoundError):
            torchstow.delete(self.uri(root_uri, "step-10"), storage_options=opts)
        for step in (1, 2):
            torchstow.delete(self.uri(root_uri, f"step-{step}"), storage_options=opts)
        crashed = self.uri(root_uri, "step-99")  # its files are young: as far as delete can tell, in flight
        if isinstance(open_backend(crashed, opts), StoreBackend):  # gc's rule is on byte stores
            with pytest.raises(SaveInFlightError):
                torchstow.delete(crashed, storage_options=opts)
        torchstow.delete(crashed, storage_options=opts, force=True)
        assert torchstow.list_checkpoints(root_uri, storage_options=opts) == []

    @rule(
        "a checkpoint that was never saved is CheckpointNotFoundError",
        "raise FileNotFoundError from read_file for a missing manifest, also where the location does not "
        "exist",
    )
    def test_missing_checkpoint(self, root_uri: str, storage_options: dict[str, Any]) -> None:
        uri = self.uri(root_uri, "never-saved")
        with pytest.raises(CheckpointNotFoundError):
            torchstow.load({"x": torch.zeros(1)}, uri, storage_options=storage_options)
        with pytest.raises(CheckpointNotFoundError):
            torchstow.read(uri, storage_options=storage_options)
        with pytest.raises(CheckpointNotFoundError):
            torchstow.info(uri, storage_options=storage_options)

    @rule(
        "a data file missing from a committed checkpoint is CorruptCheckpointError naming it",
        "raise FileNotFoundError from read_into for a missing file",
    )
    def test_missing_data_file(
        self, root_uri: str, storage_options: dict[str, Any], open_byte_store: Callable[[str], ByteStore]
    ) -> None:
        self._needs_bytes()
        uri = self.uri(root_uri, "step-1")
        torchstow.save({"x": torch.ones(100)}, uri, storage_options=storage_options)
        info = self._location(uri, "x", storage_options)
        open_byte_store(uri).delete_files([info.relative_path])
        with pytest.raises(CorruptCheckpointError, match=info.relative_path):
            torchstow.load({"x": torch.zeros(100)}, uri, storage_options=storage_options)

    @rule(
        "a flipped byte is ChecksumMismatchError naming the key and file",
        "return the stored bytes as they are (no caching of what was written before a rewrite)",
    )
    def test_corrupted_bytes_are_detected(
        self, root_uri: str, storage_options: dict[str, Any], open_byte_store: Callable[[str], ByteStore]
    ) -> None:
        self._needs_bytes()
        uri = self.uri(root_uri, "step-1")
        sd = {"x": torch.arange(1000, dtype=torch.float32), "y": torch.ones(10)}
        torchstow.save(sd, uri, storage_options=storage_options)
        info = self._location(uri, "x", storage_options)
        store = open_byte_store(uri)
        data = bytearray(store.read_file(info.relative_path))
        data[info.offset + 1001] ^= 0x40
        self._rewrite(store, info.relative_path, bytes(data))
        with pytest.raises(ChecksumMismatchError, match=r"'x'.*" + info.relative_path):
            torchstow.load(
                {"x": torch.zeros(1000), "y": torch.zeros(10)}, uri, storage_options=storage_options
            )
        with pytest.raises(ChecksumMismatchError):
            torchstow.read(uri, keys=["x"], storage_options=storage_options)
        assert_same_state(torchstow.read(uri, keys=["y"], storage_options=storage_options), {"y": sd["y"]})

    @rule(
        "a truncated data file is CorruptCheckpointError saying 'truncated'",
        "raise CorruptCheckpointError('<location>/<name> is truncated ...') when a ranged read comes back "
        "short, and report real sizes from file_sizes",
    )
    def test_truncated_data_file(
        self, root_uri: str, storage_options: dict[str, Any], open_byte_store: Callable[[str], ByteStore]
    ) -> None:
        self._needs_bytes()
        uri = self.uri(root_uri, "step-1")
        sd = {"a": torch.ones(1000), "x": torch.ones(1000)}
        torchstow.save(sd, uri, storage_options=storage_options)
        info = self._location(uri, "x", storage_options)
        store = open_byte_store(uri)
        data = store.read_file(info.relative_path)
        assert info.offset > 0, "a is stored before x"
        for cut in (info.offset + info.length // 2, info.offset - 10):  # inside x, and before it
            self._rewrite(store, info.relative_path, data[:cut])
            with pytest.raises(CorruptCheckpointError, match="truncated"):
                torchstow.read(uri, keys=["x"], storage_options=storage_options)

    @rule(
        "a damaged manifest is CorruptCheckpointError naming it, and latest skips it",
        "return the manifest bytes unchanged from read_file",
    )
    def test_corrupted_manifest(
        self, root_uri: str, storage_options: dict[str, Any], open_byte_store: Callable[[str], ByteStore]
    ) -> None:
        self._needs_bytes()
        uri = self.uri(root_uri, "step-1")
        torchstow.save({"x": torch.ones(4)}, uri, storage_options=storage_options)
        store = open_byte_store(uri)
        store.publish(MANIFEST, store.read_file(MANIFEST)[:-20])
        with pytest.raises(CorruptCheckpointError, match=MANIFEST):
            torchstow.info(uri, storage_options=storage_options)
        with pytest.raises(CorruptCheckpointError):
            torchstow.load({"x": torch.zeros(4)}, uri, storage_options=storage_options)
        assert torchstow.latest(root_uri, storage_options=storage_options) is None

    @rule(
        "several checkpoints saved at once under one prefix are each whole",
        "make prepare idempotent under races and keep no per-location state shared between store instances; "
        "or set concurrent_saves = False",
    )
    def test_concurrent_checkpoints_under_one_prefix(
        self, root_uri: str, storage_options: dict[str, Any]
    ) -> None:
        if not self.concurrent_saves:
            pytest.skip(f"{type(self).__name__} declares no concurrent saves (concurrent_saves = False)")
        states = {step: {"w": torch.full((256, 64), float(step)), "step": step} for step in range(4)}
        errors: list[BaseException] = []

        def save(step: int) -> None:
            try:
                torchstow.save(
                    states[step], self.uri(root_uri, f"step-{step}"), storage_options=storage_options
                )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(step,)) for step in states]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        found = torchstow.list_checkpoints(root_uri, storage_options=storage_options)
        assert [i.step for i in found] == [0, 1, 2, 3]
        for step, sd in states.items():
            assert_same_state(
                torchstow.read(self.uri(root_uri, f"step-{step}"), storage_options=storage_options), sd
            )

    @rule(
        "of two saves creating one new checkpoint exactly one commits",
        "override ByteStore.publish_new with one exclusive operation of the medium (not a check then "
        "publish), or set exclusive_commits = False",
    )
    def test_two_saves_of_one_new_checkpoint_commit_once(
        self, root_uri: str, storage_options: dict[str, Any]
    ) -> None:
        if not self.exclusive_commits:
            pytest.skip(f"{type(self).__name__} declares no exclusive commits (exclusive_commits = False)")
        uri = self.uri(root_uri, "step-1")
        outcomes: dict[float, str] = {}

        class Slow(torchstow.planning.DefaultSavePlanner):
            """Holds each save between its existence check and its commit, so they overlap."""

            def resolve_data(self, write_item: Any) -> Any:
                time.sleep(0.2)
                return super().resolve_data(write_item)

        def save(value: float) -> None:
            try:
                torchstow.save(
                    {"w": torch.full((64,), value)}, uri, storage_options=storage_options, planner=Slow()
                )
                outcomes[value] = "committed"
            except CheckpointExistsError:
                outcomes[value] = "exists"

        threads = [threading.Thread(target=save, args=(value,)) for value in (1.0, 2.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes.values()) == ["committed", "exists"], outcomes
        winner = next(value for value, outcome in outcomes.items() if outcome == "committed")
        got = torchstow.read(uri, storage_options=storage_options)
        assert_same_state(got, {"w": torch.full((64,), winner)})
