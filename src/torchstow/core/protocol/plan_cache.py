"""Reusing the global save plan when a state dict's structure has not changed.

A training run saves the same structure again and again: the same keys,
shapes, dtypes and placements on the same ranks. Every rank keeps what the
last full planning gave it (its final plan; on the coordinator also the
manifest it built), keyed by the process group. A later save computes its
local plan as always, hashes its structure, and the ranks exchange one small
fixed-size record each (one all-gather):

- ``ok``: this rank has a cached plan, its structure digest equals the one
  cached, and its writer can renew the plan (fresh file names);
- the *generation* of its cache: a hash of every rank's digest at the full
  planning it came from, so all ranks' caches provably come from the same one;
- its current digest, from which a full planning derives the next generation.

Every rank sees every record, so all decide alike: a hit when every rank is
``ok`` with the same generation, else a full planning on every rank. A hit
gathers and scatters no plans. Values the plan carries inline (JSON leaves
such as a step counter) are data, not structure: on a hit they travel with
the write results, and the coordinator puts them into the cached manifest.

Turn it off with ``DefaultSavePlanner(enable_plan_caching=False)`` (a planner
without an ``enable_plan_caching`` attribute that is true never caches); such a
rank still sends its record, with no digest, so every rank runs the same
collectives whatever planner each holds, and all plan in full. A
save plans in full over a collective without a ``plan_cache_key`` (a single
process, the checkpointer's barrier-ordered exchange, whose rounds are fixed).
"""

from __future__ import annotations

import hashlib
import marshal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torchstow.core.planning import SavePlan, SavePlanner
from torchstow.core.protocol.collective import Collective
from torchstow.core.protocol.failures import CapturedFailure, capture
from torchstow.core.storage.interfaces import StorageWriter, WriteResult
from torchstow.format.leaves import JSON
from torchstow.format.manifest import BytesStorageMetadata, Metadata

__all__ = ["PlannedSave", "clear_plan_cache", "plan_save", "structure_digest"]

_DIGEST = 16
_RECORD = 1 + 2 * _DIGEST
_NO_DIGEST = bytes(_DIGEST)


@dataclass
class _Entry:
    """What one rank keeps from the last full planning through a group."""

    generation: bytes
    digest: bytes
    plan: SavePlan
    template: Metadata | None  # the coordinator's manifest, before any commit touched it
    json_sources: dict[str, int]  # JSON leaf -> the rank whose value the manifest holds


_cache: dict[tuple[Any, ...], _Entry] = {}


def clear_plan_cache() -> None:
    """Forget every cached plan (the next save through each group plans in full)."""
    _cache.clear()


def structure_digest(plan: SavePlan, planner: SavePlanner, writer: StorageWriter) -> bytes | None:
    """A 16-byte hash of what global planning depends on in ``plan``: every item's key,
    kind, chunk, global shape, dtype and encoding, the containers, and the planner's
    and writer's types. Values inline in the plan (JSON leaves) are left out.
    None when the plan holds something this hash cannot describe."""
    shared: dict[int, int] = {}
    chunks: list[tuple[Any, ...]] = []
    rows: list[tuple[Any, ...]] = []
    for item in plan.items:
        offset = item.index.offset
        where = None if offset is None else tuple(offset)
        td = item.tensor_data
        if td is not None:
            n = shared.get(id(td))
            if n is None:
                n = shared[id(td)] = len(chunks)
                props = td.properties
                chunk = td.chunk
                chunks.append(
                    (
                        str(props.dtype),
                        props.requires_grad,
                        tuple(chunk.offsets),
                        tuple(chunk.sizes),
                        tuple(td.size),
                    )
                )
            rows.append((item.index.fqn, where, item.type.value, n))
        else:
            encoding = item.bytes_data.encoding if item.bytes_data is not None else None
            rows.append((item.index.fqn, where, item.type.value, encoding))
    kinds = (
        type(planner).__module__,
        type(planner).__qualname__,
        getattr(planner, "dedup_replicated_tensors", None),
        type(writer).__module__,
        type(writer).__qualname__,
    )
    try:
        # Version 2: no back-references, so equal structures always give equal bytes.
        payload = marshal.dumps((kinds, plan.storage_data, plan.planner_data, chunks, rows), 2)
    except ValueError:
        return None
    return hashlib.blake2b(payload, digest_size=_DIGEST).digest()


def _json_values(plan: SavePlan) -> dict[str, Any]:
    return {
        item.index.fqn: item.bytes_data.value
        for item in plan.items
        if item.bytes_data is not None and item.bytes_data.encoding == JSON
    }


@dataclass
class _HitOutcome:
    """What a rank reports after writing on a hit: its results and its JSON values."""

    results: list[WriteResult]
    json_values: dict[str, Any]


@dataclass
class PlannedSave:
    """The plan a rank writes with, and how the commit gets its manifest.

    ``hit`` tells whether the global plan was reused. ``local`` is this
    rank's fresh local plan (None where planning failed).
    """

    plan: SavePlan
    hit: bool
    local: SavePlan | None
    entry: _Entry | None = None

    def outcome(self, results: list[WriteResult]) -> Any:
        """What this rank sends to the coordinator after writing."""
        if not self.hit:
            return results
        assert self.local is not None
        return _HitOutcome(results, _json_values(self.local))

    def commit_inputs(
        self, metadata: Metadata | None, outcomes: list[Any], user_metadata: dict[str, Any] | None
    ) -> tuple[Metadata, list[list[WriteResult]]]:
        """On the coordinator: the manifest to commit and every rank's write results."""
        if not self.hit:
            assert metadata is not None
            return metadata, outcomes
        assert self.entry is not None and self.entry.template is not None
        template = self.entry.template
        entries = dict(template.state_dict_metadata)
        for fqn, rank in self.entry.json_sources.items():
            entries[fqn] = BytesStorageMetadata(JSON, outcomes[rank].json_values[fqn])
        fresh = replace(
            template,
            state_dict_metadata=entries,
            user_metadata=dict(user_metadata or {}),
            storage_data=None,
            committed_at=None,
        )
        return fresh, [outcome.results for outcome in outcomes]


def _record(ok: bool, generation: bytes, digest: bytes | None) -> bytes:
    return bytes([ok]) + generation + (digest or _NO_DIGEST)


def plan_save(
    coll: Collective,
    planner: SavePlanner,
    writer: StorageWriter,
    local_fn: Callable[[], SavePlan],
    global_fn: Callable[[list[SavePlan]], list[SavePlan]],
    full_planning: Callable[..., Any],
    global_metadata: list[Metadata],
) -> PlannedSave:
    """Plan a save: reuse the cached global plan when every rank agrees, else run
    ``full_planning(coll, step, local_fn, global_fn)`` (the protocol's reduce-scatter).

    ``global_metadata`` is where ``global_fn`` leaves the coordinator's manifest.
    """
    key = coll.plan_cache_key()
    if key is None:
        return PlannedSave(full_planning(coll, "save planning", local_fn, global_fn), False, None)
    # A planner that does not cache still exchanges its record (with no digest): which
    # collectives a rank runs must not depend on its planner, which a rank whose save
    # failed before the protocol began (the async stand-in) does not have.
    caching = bool(getattr(planner, "enable_plan_caching", False))
    local = capture(local_fn)
    failed = isinstance(local, CapturedFailure)
    digest = None if failed or not caching else capture(lambda: structure_digest(local, planner, writer))
    if isinstance(digest, CapturedFailure):
        digest = None
    entry = _cache.get(key)
    renewed = None
    if entry is not None and digest is not None and digest == entry.digest:
        renewed = capture(lambda: writer.renew_plan(entry.plan))
        if isinstance(renewed, CapturedFailure):
            renewed = None
    generation = entry.generation if entry is not None else _NO_DIGEST
    records = coll.all_gather_records(_record(renewed is not None, generation, digest), "save plan cache")
    if all(r[0] == 1 and r[1 : 1 + _DIGEST] == generation for r in records):
        assert renewed is not None and entry is not None and not failed
        return PlannedSave(renewed, True, local, entry)
    _cache.pop(key, None)

    def replay() -> SavePlan:
        if isinstance(local, CapturedFailure):
            raise local.exc
        return local

    sources: dict[str, int] = {}

    def plan_globally(all_plans: list[SavePlan]) -> list[SavePlan]:
        planned = global_fn(all_plans)
        # A hit takes each JSON leaf from the rank whose value this full planning chose.
        entries = global_metadata[0].state_dict_metadata
        for rank, plan in enumerate(all_plans):
            for fqn, value in _json_values(plan).items():
                entry = entries.get(fqn)
                if isinstance(entry, BytesStorageMetadata) and entry.value is value:
                    sources[fqn] = rank
        return planned

    central = full_planning(coll, "save planning", replay, plan_globally)
    if all(r[1 + _DIGEST :] != _NO_DIGEST for r in records):
        template = None
        if coll.is_coordinator:
            made = global_metadata[0]
            template = replace(made, state_dict_metadata=dict(made.state_dict_metadata))
        new_generation = hashlib.blake2b(
            b"".join(r[1 + _DIGEST :] for r in records), digest_size=_DIGEST
        ).digest()
        assert digest is not None
        _cache[key] = _Entry(new_generation, digest, central, template, sources)
    return PlannedSave(central, False, None if failed else local)
