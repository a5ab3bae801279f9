"""The ``torchstow`` command: argparse for the verbs, one-line errors, exit statuses.

Exit status 0 on success, 1 on an error (one line, ``torchstow: error: ...``,
on stderr; ``--debug`` adds the traceback) or when ``verify`` finds
corruption, 2 on a usage error, 130 when interrupted, 141 (quietly) when the reader of
its output has gone (``torchstow ls | head -1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torchstow
from torchstow.cli.commands import VERBS
from torchstow.cli.demo import demo
from torchstow.cli.render import parse_size
from torchstow.format.compression import COMPRESSIONS
from torchstow.interop.convert import FORMATS
from torchstow.management.gc import GRACE
from torchstow.plugins.manager import default_registry

__all__ = ["build_parser", "main"]


def storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is parsed as JSON when it parses, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _count(least: int) -> Any:
    """An argparse type: an integer of at least ``least`` (else a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            what = "a non-negative" if least == 0 else "a positive"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} integer")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite non-negative number of seconds (else a usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite non-negative number of seconds")
    return value + 0.0  # -0 is 0


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(json_output: bool = True, progress: bool = False) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parent.add_argument(
        "-o",
        "--storage-option",
        metavar="KEY=VALUE",
        type=storage_option,
        action="append",
        help="a storage option of the backend (repeatable; VALUE is JSON when it parses)",
    )
    if json_output:
        parent.add_argument("--json", action="store_true", help="print one JSON document (see docs/cli.md)")
    if progress:
        parent.add_argument(
            "--no-progress",
            dest="progress",
            action="store_false",
            help="no progress bar (one shows on stderr only when it is a terminal)",
        )
    return parent


def _two_sided(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument(
        "--src-option",
        metavar="KEY=VALUE",
        type=storage_option,
        action="append",
        help="a storage option for the source only (repeatable)",
    )
    parser.add_argument(
        "--dst-option",
        metavar="KEY=VALUE",
        type=storage_option,
        action="append",
        help="a storage option for the destination only (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what is at DST")
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        help="write DST compressed (each chunk on its own; see docs/format.md); cp then rewrites "
        "every item instead of copying the stored bytes",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="torchstow",
        description="Look after PyTorch checkpoints on any storage: "
        "list, inspect, verify, copy, convert, prune, gc.",
        epilog="Every verb takes --debug; reading verbs take --json and -o KEY=VALUE. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {torchstow.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plain, bar = _common(), _common(progress=True)

    def verb(name: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        fn = VERBS[name]
        p = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__, parents=parents)
        p.set_defaults(fn=fn)
        return p

    p = verb("ls", [bar])
    p.add_argument("prefix")
    p.add_argument("--all", action="store_true", help="show incomplete and unreadable checkpoints too")
    p.add_argument("--tiers", action="store_true", help="a tiered run's steps and the tiers holding each")
    p.add_argument("--fast", metavar="URI", help="with --tiers: the fast tier ({node} for the node index)")
    verb("info", [plain]).add_argument("uri")
    p = verb("inspect", [plain])
    p.add_argument("uri")
    p.add_argument("pattern", nargs="?", help="a glob on the dotted keys, e.g. 'model.*.weight'")
    verb("verify", [bar]).add_argument("uris", nargs="+", metavar="URI")
    _two_sided(verb("cp", [bar]))
    p = verb("rm", [plain])
    p.add_argument("uri")
    p.add_argument(
        "--force", action="store_true", help="delete even while a save may be writing there (see gc)"
    )
    verb("du", [bar]).add_argument("prefix")
    p = verb("prune", [bar])
    p.add_argument("prefix")
    p.add_argument("--keep-last", type=_count(0), required=True, metavar="N", help="keep the newest N")
    p.add_argument(
        "--keep-every", type=_count(1), metavar="K", help="also keep every step that is a multiple of K"
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = verb("gc", [plain])
    p.add_argument("prefix")
    p.add_argument(
        "--older-than",
        type=_seconds,
        default=GRACE,
        metavar="SECONDS",
        help=f"the grace period: leave debris younger than this (default {GRACE:g})",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p = verb("convert", [bar])
    _two_sided(p)
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument(
        "--keys", metavar="PREFIX", help="keep only the keys under PREFIX (e.g. model.) and strip it"
    )
    p.add_argument("--dtype", help="cast floating tensors (e.g. bfloat16)")
    p.add_argument("--max-shard-size", type=size, metavar="SIZE", help="safetensors shard size (default 5GB)")
    verb("backends", [plain])
    p = sub.add_parser(
        "demo", help=demo.__doc__, description=demo.__doc__, parents=[_common(json_output=False)]
    )
    p.add_argument("--path", help="directory to save into (default: a new temp dir)")
    p.set_defaults(fn=demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(str(text).split()) or type(exc).__name__
    builtin = isinstance(exc, OSError | ValueError | TypeError | KeyError | ImportError)
    if type(exc).__module__.startswith("torchstow") or (builtin and type(exc).__module__ == "builtins"):
        return text
    return f"{type(exc).__name__}: {text}"


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line. A verb's options may come before, between or after its
    positional arguments (``inspect URI --json PATTERN``), and a usage error in a verb
    prints that verb's usage."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verb = verbs.choices[args.command]
    if extra:
        words = list(sys.argv[1:] if argv is None else argv)
        command = args.command
        args = verb.parse_intermixed_args(words[words.index(command) + 1 :])
        args.command = command
    if getattr(args, "fast", None) is not None and not args.tiers:
        verb.error("--fast goes with --tiers")  # exits 2
    for name in ("uri", "prefix", "src", "dst", "uris"):
        given = getattr(args, name, None)
        if given == "" or (isinstance(given, list) and "" in given):
            verb.error(f"the {name.rstrip('s').upper()} argument is empty")  # exits 2
    return args


def _canonical_uris(args: argparse.Namespace) -> None:
    """Write the URIs of the command line as backends take them (``S3://`` is ``s3://``);
    a typo such as ``s3:/bucket/x`` is an error rather than a local path."""
    registry = default_registry()
    for name in ("uri", "prefix", "src", "dst"):
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, registry.canonical_uri(getattr(args, name)))
    if getattr(args, "uris", None):
        args.uris = [registry.canonical_uri(uri) for uri in args.uris]


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (``torchstow ls | head -1``)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):  # Windows: no way to tell, so an error as any other
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """Print ``exc`` as the one-line error (and the traceback with ``--debug``); exit status 1."""
    if args.debug:
        traceback.print_exc()
    print(f"torchstow: error: {_one_line(exc)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchstow`` command; returns the exit status."""
    args = parse(argv)
    try:
        _canonical_uris(args)
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("torchstow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if not _stdout_gone():
            return _failed(args, exc)
        # the reader took what it wanted: stop quietly, as `yes | head -1` does (and keep the
        # interpreter's last flush from writing to the closed pipe)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        return _failed(args, exc)
