"""Storage options for commands with two sides (copy, convert): which side takes which option."""

from __future__ import annotations

from typing import Any

from torchstow.plugins.manager import accepted_storage_options, default_registry

__all__ = ["route_options"]


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
    """Split storage options between a source and a destination.

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
