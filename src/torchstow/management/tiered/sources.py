"""The store a tiered restore reads from: each data file from the fastest source holding it.

A read-only :class:`ByteStore` that answers for one step: the manifest from
memory, data files from this node's fast tier, from buffers a peer node sent
over the process group, or from the durable root. The ordinary layout reader
reads through it, verifying every block as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from torchstow.core.storage.store import ByteStore, FileSink
from torchstow.errors import CorruptCheckpointError
from torchstow.format.files import MANIFEST

__all__ = ["TieredSources"]


class TieredSources(ByteStore):
    """Files of one step: ``received`` buffers, else ``routes[name]`` (a store)."""

    def __init__(
        self,
        location: str,
        manifest: bytes,
        routes: Mapping[str, ByteStore],
        received: Mapping[str, torch.Tensor],
        sizes: Mapping[str, int],
    ) -> None:
        self.location = location
        self._manifest = manifest
        self._routes = dict(routes)
        self._received = dict(received)
        self._sizes = {name: sizes[name] for name in [*self._routes, *self._received]}
        # One read covers what the slowest-to-reach source wants (big ranged requests for
        # object stores, where 1 MiB reads one after another would crawl).
        self.read_segment_bytes = max(
            (store.read_segment_bytes for store in self._routes.values()), default=self.read_segment_bytes
        )

    def _store(self, name: str) -> ByteStore:
        store = self._routes.get(name)
        if store is None:
            raise FileNotFoundError(f"{self.location}: no source holds {name}")
        return store

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        buffer = self._received.get(name)
        if buffer is None:
            self._store(name).read_into(name, requests)
            return
        for offset, target in requests:
            end = offset + target.nbytes
            if end > len(buffer):
                raise CorruptCheckpointError(f"{self.location}/{name} ends before byte {end}")
            if target.nbytes:
                torch.frombuffer(target, dtype=torch.uint8).copy_(buffer[offset:end])

    def read_in_order(
        self, name: str, requests: Sequence[tuple[int, memoryview]], landed: Callable[[int], None]
    ) -> None:
        if name in self._received:
            super().read_in_order(name, requests, landed)
        else:
            self._store(name).read_in_order(name, requests, landed)

    def read_file(self, name: str) -> bytes:
        if name == MANIFEST:
            return self._manifest
        buffer = self._received.get(name)
        if buffer is not None:
            return buffer.numpy().tobytes()
        return self._store(name).read_file(name)

    def file_sizes(self) -> dict[str, int]:
        return {MANIFEST: len(self._manifest), **self._sizes}

    def list_files(self) -> list[str]:
        return sorted(self.file_sizes())

    def prepare(self) -> None:
        raise PermissionError(f"{self.location} is read-only (a restore's view of its sources)")

    def create(self, name: str) -> FileSink:
        raise PermissionError(f"{self.location} is read-only (a restore's view of its sources)")

    def publish(self, name: str, data: bytes) -> None:
        raise PermissionError(f"{self.location} is read-only (a restore's view of its sources)")

    def delete_files(self, names: Sequence[str]) -> None:
        raise PermissionError(f"{self.location} is read-only (a restore's view of its sources)")

    def remove_location(self) -> None:
        raise PermissionError(f"{self.location} is read-only (a restore's view of its sources)")
