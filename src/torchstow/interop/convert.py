"""``convert``: any checkpoint format to torchstow, DCP, ``torch.save`` or Hugging Face safetensors.

The source is opened through :mod:`torchstow.interop.sources` and read one
tensor at a time; the torchstow, DCP and safetensors writers take each
tensor as they write it, so memory holds a few tensors, not the state.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchstow.errors import CheckpointException, PickleNotAllowedError
from torchstow.format.compression import check_compression
from torchstow.interop import targets
from torchstow.interop.sources import Source, TensorSpec, local_path, open_source
from torchstow.plugins.resolve import route_options

__all__ = ["FORMATS", "ConvertReport", "Selection", "convert", "parse_dtype"]

FORMATS = tuple(targets.TARGETS)  # torchstow, dcp, torch, safetensors
ProgressCallback = Callable[[int, int], None]

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``"torch.float16"`` or a ``torch.dtype``: the floating dtype meant."""
    if dtype is None or isinstance(dtype, torch.dtype):
        chosen = dtype
    else:
        name = str(dtype).removeprefix("torch.").lower()
        chosen = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(chosen, torch.dtype) and dtype is not None:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. bfloat16, float16 or float32")
    if chosen is not None and not chosen.is_floating_point:
        raise ValueError(f"dtype casts floating tensors, so it must be a floating dtype, not {chosen}")
    return chosen


@dataclass
class ConvertReport:
    """What :func:`convert` wrote: the counts, the files, and the values it left out (key, reason)."""

    src: str
    dst: str
    source_format: str
    to: str
    tensors: int = 0
    nbytes: int = 0
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON form the command prints (see docs/cli.md)."""
        return {
            "src": self.src,
            "dst": self.dst,
            "source_format": self.source_format,
            "to": self.to,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "files": self.files,
            "skipped": [{"key": k, "reason": r} for k, r in self.skipped],
        }


class Selection:
    """The keys a conversion writes (output key -> source key), their specs after the
    cast, and a thread-safe ``fetch`` that reads and casts one tensor and reports progress."""

    def __init__(
        self,
        source: Source,
        keys: str | None,
        dtype: torch.dtype | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.source = source
        self.dtype = dtype
        self.prefix = None if keys is None else (keys if keys.endswith(".") else keys + ".")
        if self.prefix is None:
            self.keys = {k: k for k in source.specs}
        else:
            self.keys = {k[len(self.prefix) :]: k for k in source.specs if k.startswith(self.prefix)}
            if not self.keys:
                sample = ", ".join(list(source.specs)[:5])
                raise KeyError(f"no key of {source.uri} starts with {self.prefix!r}; it has e.g. {sample}")
        self.specs: dict[str, TensorSpec | None] = {}
        for out, src in self.keys.items():
            spec = source.specs[src]
            if spec is not None and dtype is not None and spec.dtype.is_floating_point:
                spec = TensorSpec(dtype, spec.shape)
            self.specs[out] = spec
        self.total = sum(s.nbytes for s in self.specs.values() if s is not None)
        self._progress = progress
        self._lock = threading.Lock()

    @property
    def nested(self) -> bool:
        """Whether the output keeps the source's nesting (no prefix was stripped)."""
        return self.prefix is None and self.source.planner_data is not None

    def fetch(self, key: str) -> torch.Tensor:
        spec = self.specs[key]
        tensor = self.source.read_tensor(self.keys[key])
        if spec is not None and tensor.dtype != spec.dtype:
            tensor = tensor.to(spec.dtype)
        if self._progress is not None:
            with self._lock:
                self._progress(tensor.nbytes, self.total)
        return tensor

    def read_object(self, key: str) -> Any:
        return self.source.read_object(self.keys[key])


def _local_target(dst: str, to: str) -> str:
    path = local_path(dst)
    if path is None:
        raise ValueError(
            f"convert writes {to} to local paths only, not {dst}; convert to a local path and upload "
            "it, or convert --to torchstow, which writes to any backend"
        )
    return path


def _resolved(uri: str) -> tuple[str, str]:
    """``uri`` spelled one way per location: a local path with its links, ``..`` and
    trailing slashes resolved, or a URI with its scheme lowercased; and its separator."""
    path = local_path(uri)
    if path is not None:
        return os.path.realpath(path), os.sep
    scheme, _, rest = uri.partition("://")
    return f"{scheme.lower()}://{rest.rstrip('/')}", "/"


def same_location(one: str, other: str) -> bool:
    """Whether the URIs or paths ``one`` and ``other`` name one location, however spelled."""
    (a, sep), (b, _) = _resolved(one), _resolved(other)
    return _same(a, b, sep)


def _same(a: str, b: str, sep: str) -> bool:
    """Whether the resolved locations ``a`` and ``b`` (separator ``sep``) are one."""
    return a == b or (sep == os.sep and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_apart(src: str, dst: str, verb: str = "convert") -> None:
    """Refuse (ValueError) a destination that is the source, holds it or lies inside it:
    writing it would overwrite or delete the bytes being read (``verb``: what is refused)."""
    (a, sep), (b, _) = _resolved(src), _resolved(dst)
    if _same(a, b, sep):
        raise ValueError(f"cannot {verb} {src} onto itself ({dst} is the same location)")
    if a.startswith(b.rstrip(sep) + sep) or b.startswith(a.rstrip(sep) + sep):
        raise ValueError(
            f"cannot {verb} {src} to {dst}: one lies inside the other, so writing would "
            "overwrite what is being read; write to a location outside the source"
        )


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    keys: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    compression: str | None = None,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``.

    ``to`` is ``"torchstow"`` (any backend), ``"dcp"`` (a local directory as
    ``dcp.save`` writes it), ``"torch"`` (one ``torch.save`` file) or
    ``"safetensors"`` (a local directory of Hugging Face shards with
    ``model.safetensors.index.json``). The source format is detected.
    ``keys`` keeps the keys under a prefix (``"model."``) and strips it;
    ``dtype`` casts floating tensors; ``max_shard_bytes`` caps a safetensors
    shard (default 5 GB). ``storage_options`` go to each side whose backend
    takes them; ``src_storage_options``/``dst_storage_options`` to one side.
    Values safetensors cannot hold are listed in the report's ``skipped``.
    ``compression="zstd"`` compresses a torchstow target as ``save`` does (ValueError
    for other targets).
    """
    target = targets.TARGETS.get(to)
    if target is None:
        raise ValueError(f"unknown target format {to!r}; choose one of {', '.join(FORMATS)}")
    check_compression(compression)
    if compression is not None and to != "torchstow":
        raise ValueError(f"compression= applies to torchstow targets, not {to!r}")
    src_text, dst_text = os.fspath(src), os.fspath(dst)
    src_opts, dst_opts = route_options(
        src_text,
        dst_text,
        storage_options,
        src_storage_options,
        dst_storage_options,
        dst_backend=not target.local_only,
    )
    cast = parse_dtype(dtype)
    if target.local_only:
        dst_text = _local_target(dst_text, to)
    check_apart(src_text, dst_text)
    targets.check_destination(target, dst_text, overwrite, dst_opts)
    source = open_source(src_text, src_opts)
    try:
        selection = Selection(source, keys, cast, progress)
        report = ConvertReport(src_text, dst_text, source.format, to)
        options = targets.TargetOptions(overwrite, dst_opts, max_shard_bytes, compression)
        try:
            target.write(selection, dst_text, options, report)
        except PickleNotAllowedError as exc:  # its advice names an allow_pickle convert does not take
            cause: BaseException = exc
            while isinstance(cause, CheckpointException) and len(cause.failures) == 1:
                cause = next(iter(cause.failures.values()))[0]
            raise PickleNotAllowedError(
                f"{src_text}: {cause}. convert never unpickles (it takes no allow_pickle): leave the "
                "value out with keys= (--keys), or convert to safetensors, which skips it; if you "
                "trust the checkpoint, torchstow.save(torchstow.read(src, allow_pickle=True), dst, "
                "allow_pickle=True)"
            ) from exc
    finally:
        with contextlib.suppress(Exception):
            source.close()
    return report
