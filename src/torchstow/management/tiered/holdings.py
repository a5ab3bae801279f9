"""What the fast tiers hold: one node's inventory, and the steps complete across nodes.

Shared by the manager (which gathers every node's inventory over the process
group) and ``torchstow ls ROOT --tiers`` (which reads the fast tiers this
machine can see).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torchstow.core.layout.location import manifest_bytes
from torchstow.core.storage.backend import StoreBackend
from torchstow.errors import CorruptCheckpointError
from torchstow.format.codec import decode_metadata
from torchstow.format.files import MANIFEST, is_data_file
from torchstow.format.manifest import Metadata
from torchstow.management.steps import step_of, step_uri

__all__ = ["Choice", "Held", "complete_steps", "fast_steps", "inventory"]

logger = logging.getLogger("torchstow.management")


@dataclass
class Held:
    """What one node's fast tier holds of one step."""

    manifest: bytes | None
    files: dict[str, int]  # data file name -> size


@dataclass
class Choice:
    """A step whose every data file some node holds: its manifest, and who holds what."""

    step: int
    metadata: Metadata
    manifest: bytes
    holders: dict[str, list[int]]  # data file -> nodes holding it (intact, once verified)
    root_files: set[str] = field(default_factory=set)


def fast_steps(backend: StoreBackend, fast: str) -> list[int]:
    """The steps with a ``step-<n>`` location under the fast tier ``fast`` (committed or not)."""
    found = []
    for child in backend.list_children(fast):
        step = step_of(child)
        if step is not None and child.rstrip("/").endswith(f"step-{step}"):
            found.append(step)
    return sorted(found)


def inventory(backend: StoreBackend, fast: str) -> dict[int, Held]:
    """What the fast tier ``fast`` holds, by step: its manifest (if committed) and data files."""
    held = {}
    for step in fast_steps(backend, fast):
        store = backend.open_store(step_uri(fast, step))
        sizes = store.file_sizes()
        if sizes is None:
            sizes = {name: len(store.read_file(name)) for name in store.list_files()}
        try:
            manifest: bytes | None = manifest_bytes(store)
        except FileNotFoundError:
            manifest = None
        except CorruptCheckpointError as exc:  # larger than a manifest: as one that does not decode
            logger.warning("step %d: a fast tier's manifest is unreadable: %s", step, exc)
            manifest = None
        held[step] = Held(manifest, {n: s for n, s in sizes.items() if is_data_file(n)})
    return held


def complete_steps(holdings: dict[int, dict[int, Held]], only: int | None = None) -> list[Choice]:
    """The steps (or step ``only``) whose every data file some node holds, newest first.

    ``holdings`` is each node's :func:`inventory`. Nothing is verified here:
    files are only known to be present.
    """
    choices = []
    steps = {s for inv in holdings.values() for s in inv}
    for step in sorted(steps, reverse=True):
        if only is not None and step != only:
            continue
        manifests = [m for _, inv in sorted(holdings.items()) if step in inv and (m := inv[step].manifest)]
        if not manifests:
            continue
        manifest = max(set(manifests), key=manifests.count)  # nodes agree unless a step was saved twice
        try:
            metadata = decode_metadata(manifest, source=f"the fast tier's step-{step}/{MANIFEST}")
        except Exception as exc:
            logger.warning("step %d: a fast tier's manifest is unreadable: %s", step, exc)
            continue
        needed = {info.relative_path for info in (metadata.storage_data or {}).values()}
        holders = {
            name: [n for n, inv in sorted(holdings.items()) if step in inv and name in inv[step].files]
            for name in needed
        }
        if all(holders.values()):
            choices.append(Choice(step, metadata, manifest, holders))
    return choices
