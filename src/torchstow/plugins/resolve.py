"""From what a caller passes to a backend: a URI checked and canonicalised, the backend
that serves it built with its storage options, and options split between two sides.

Every entry point (``api``, ``management``, ``interop``, the CLI, the engines) resolves
locations here, once, through the installed plugins' registry.
"""

from __future__ import annotations

import os
from typing import Any

from torchstow.core.storage.backend import Backend
from torchstow.plugins.manager import accepted_storage_options, default_registry

__all__ = ["Uri", "backend_at", "checkpoint_uri", "route_options"]

Uri = str | os.PathLike[str]


def checkpoint_uri(uri: Uri) -> str:
    """``uri`` as a string, as backends take it (see :meth:`BackendRegistry.canonical_uri`:
    ``S3://b/x`` is ``s3://b/x``, ``s3:/b/x`` an error); a clear error for an empty or
    non-path value."""
    text = os.fspath(uri)
    if not isinstance(text, str) or not text:
        raise ValueError(f"a checkpoint URI must be a non-empty string or path, got {uri!r}")
    return default_registry().canonical_uri(text)


def backend_at(uri: Uri, storage_options: dict[str, Any] | None = None) -> tuple[str, Backend]:
    """``uri`` canonicalised (:func:`checkpoint_uri`) and the backend serving it, built
    with ``storage_options`` (checked against what the backend takes)."""
    text = checkpoint_uri(uri)
    return text, default_registry().backend_for(text, storage_options)


def _accepted(uri: str) -> set[str] | None:
    """The storage options the backend of ``uri`` takes; None when it takes any name."""
    return accepted_storage_options(default_registry().resolve(uri).backend, uri)


def _describe(uri: str, accepted: set[str] | None) -> str:
    if accepted is None:
        return f"{uri} takes any option"
    return f"{uri} takes {', '.join(sorted(accepted)) or 'none'}"


def route_options(
    src: str,
    dst: str,
    common: dict[str, Any] | None,
    src_only: dict[str, Any] | None = None,
    dst_only: dict[str, Any] | None = None,
    *,
    dst_backend: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split storage options between a source and a destination (copy, convert).

    Each option of ``common`` goes to each side whose backend takes it; a
    backend that takes any name (one that checks options itself) gets those
    the other side does not take. An option no side takes is a TypeError
    naming what each side takes. ``src_only`` and ``dst_only`` go to their
    side as they are (its backend checks them). ``dst_backend`` is False when
    the destination is a plain file rather than a backend.
    """
    src_ok = _accepted(src)
    dst_ok = _accepted(dst) if dst_backend else set()
    src_opts = dict(src_only or {})
    dst_opts = dict(dst_only or {})
    for key, value in (common or {}).items():
        src_named = src_ok is not None and key in src_ok
        dst_named = dst_ok is not None and key in dst_ok
        to_src = src_named or (src_ok is None and not dst_named)
        to_dst = dst_named or (dst_ok is None and not src_named)
        if not (to_src or to_dst):
            raise TypeError(
                f"no side takes the storage option {key!r}: {_describe(src, src_ok)}; "
                + (_describe(dst, dst_ok) if dst_backend else f"{dst} is a plain file and takes none")
            )
        if to_src:
            src_opts.setdefault(key, value)
        if to_dst:
            dst_opts.setdefault(key, value)
    return src_opts, dst_opts
