"""How the command shows things: sizes, times, key trees (rich) and progress bars (rich, on stderr)."""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.tree import Tree

__all__ = [
    "human_bytes",
    "human_duration",
    "human_time",
    "key_tree",
    "parse_size",
    "plural",
    "print_json",
    "progress_bar",
    "stdout",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"5GB"`` (10**9, as Hugging Face counts), ``"512MiB"`` (2**20) or a plain byte count."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(count: int, noun: str) -> str:
    """``1 file``, ``2 files``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_time(timestamp: float | None) -> str:
    """A commit time as local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def human_duration(seconds: float | None) -> str:
    """How long something took: ``4 ms``, ``2.41 s``, ``12.3 s``, ``2m 05s``, ``1h 02m``, or ``-``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def stdout() -> Console:
    """A console on stdout that never wraps lines, and colours only a terminal."""
    return Console(file=sys.stdout, soft_wrap=True, highlight=False)


def print_json(doc: Any) -> None:
    """One JSON document on stdout: strict JSON (a NaN or infinity is a ValueError before
    anything is printed, never ``NaN`` that ``jq`` and strict parsers refuse)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def key_tree(title: str, rows: list[tuple[str, str]]) -> Tree:
    """A tree of dotted keys; ``rows`` are ``(key, description)`` in order."""
    tree = Tree(escape(title), guide_style="dim")
    nodes: dict[tuple[str, ...], Tree] = {(): tree}
    for key, text in rows:
        parts = tuple(key.split("."))
        for depth in range(1, len(parts)):
            path = parts[:depth]
            if path not in nodes:
                nodes[path] = nodes[path[:-1]].add(f"[bold]{escape(path[-1])}[/bold]")
        nodes[parts[:-1]].add(f"{escape(parts[-1])}  {escape(text)}")
    return tree


ProgressCallback = Callable[[int, int], None]


@contextlib.contextmanager
def progress_bar(
    description: str, enabled: bool, unit: str | None = None
) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr, when ``enabled`` and stderr is a terminal: of bytes and
    their rate, or with ``unit`` (``"checkpoints"``) of things counted, cleared when done.

    Yields the ``progress(done_just_now, total)`` callback the API takes, or None.
    """
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    counts: list[ProgressColumn] = [MofNCompleteColumn(), TextColumn(unit or "")]
    amounts: list[ProgressColumn] = [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *(counts if unit else amounts),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=unit is not None,
    )
    task: TaskID | None = None

    def advance(nbytes: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(description, total=total)
        bar.update(task, advance=nbytes, total=total)

    with bar:
        yield advance
        for done in bar.tasks:  # the final line shows the average rate, even after a single update
            if done.elapsed:
                done.finished_speed = done.completed / done.elapsed
        bar.refresh()
