"""The message of a StateDictMismatchError: bounded however many keys disagree.

A load whose state dict misses every key (a DDP model's ``module.`` prefix)
names the first few keys of each list, how many there are, and the prefix
that explains them; the full lists stay on the exception's ``missing_keys``,
``unexpected_keys`` and ``mismatched``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator, Sequence

__all__ = ["SHOWN", "mismatch_message", "prefix_hint"]

SHOWN = 10  # keys (or problems) named in a message, per list

_DEPTH = 3  # prefixes of up to this many dotted components are tried
_SAMPLE = 32  # missing keys that propose a prefix

# What adds a common prefix to every key of a model's state dict.
_WRAPPERS = {
    "module.": "DistributedDataParallel and DataParallel hold the model as .module",
    "_orig_mod.": "torch.compile's wrapper holds the model as ._orig_mod",
    "model.": "a wrapper that holds the model as .model",
}


def _listed(items: Sequence[str], line: str, attribute: str, shown: int = SHOWN) -> list[str]:
    """Lines naming the first ``shown`` of ``items`` (each as ``line``), then how many more."""
    lines = [line.format(item) for item in items[:shown]]
    if len(items) > shown:
        lines.append(f"  ... and {len(items) - shown} more (all in the exception's {attribute})")
    return lines


def mismatch_message(
    head: str,
    *,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    problems: Sequence[str] = (),
    hints: Sequence[str] = (),
) -> str:
    """``head``, then the first keys missing from the checkpoint (with how many there are
    and a prefix that explains them), the first other ``problems``, then ``hints``.

    ``unexpected`` (keys only the checkpoint holds) is named only beside missing
    keys, where it tells what the checkpoint holds instead.
    """
    lines = [head]
    if missing:
        lines.append(f"{len(missing)} key(s) of the state dict missing from the checkpoint:")
        lines += _listed(missing, "  missing from the checkpoint: {}", "missing_keys")
        hint = prefix_hint(missing, unexpected)
        if hint is not None:
            lines.append(hint)
        elif unexpected:
            lines.append(f"{len(unexpected)} key(s) only in the checkpoint:")
            lines += _listed(unexpected, "  {}", "unexpected_keys", SHOWN // 2)
    lines += _listed(problems, "  {}", "mismatched")
    lines += [f"({hint})" for hint in hints]
    return "\n".join(lines)


def _splits(key: str) -> Iterator[tuple[str, str]]:
    """``(prefix, rest)`` of ``key`` at each of its first dots (``""`` first), rest not empty."""
    yield "", key
    dot = -1
    for _ in range(_DEPTH):
        dot = key.find(".", dot + 1)
        if dot < 0 or dot == len(key) - 1:
            return
        yield key[: dot + 1], key[dot + 1 :]


def prefix_hint(missing: Sequence[str], unexpected: Collection[str]) -> str | None:
    """A sentence saying which prefix turns most ``missing`` keys into keys the checkpoint
    holds (``unexpected``: those the state dict lacks), or None if none explains half of them
    (or it explains one key only and is no wrapper's)."""
    if not missing or not unexpected:
        return None
    held = set(unexpected)
    # the prefixes of checkpoint keys, from keys spread over the list (not all: a hint
    # must not cost more than the load it explains)
    spread = list(unexpected)[:: max(1, len(unexpected) // (2 * _SAMPLE))]
    prefixes = dict.fromkeys(prefix for key in spread for prefix, _ in _splits(key))
    votes: Counter[tuple[str, str]] = Counter()
    for key in missing[:_SAMPLE]:
        for ours, rest in _splits(key):  # the longest rest the checkpoint holds decides
            found = [theirs for theirs in prefixes if theirs != ours and theirs + rest in held]
            if found:
                votes.update((ours, theirs) for theirs in found)
                break
    if not votes:
        return None
    best, count = None, 0
    for (ours, theirs), _ in votes.most_common(4):
        n = sum(1 for key in missing if key.startswith(ours) and theirs + key[len(ours) :] in held)
        if n > count:
            best, count = (ours, theirs), n
    if best is None or 2 * count < len(missing):
        return None
    ours, theirs = best
    dotted = f".{ours}.{theirs}"
    why = next((note for name, note in _WRAPPERS.items() if f".{name}" in dotted), None)
    if count < 2 and why is None:  # one key renamed is no pattern
        return None
    if not theirs:
        change = f"without their leading {ours!r}"
    elif not ours:
        change = f"with {theirs!r} in front"
    else:
        change = f"with {theirs!r} in place of their leading {ours!r}"
    note = "" if why is None else f" ({why})"
    return (
        f"hint: {count} of the {len(missing)} missing key(s) are in the checkpoint {change}{note}; "
        "save and load the same (un)wrapped model, or rename the keys"
    )
