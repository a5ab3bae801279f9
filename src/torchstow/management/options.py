"""Storage options for commands with two sides (copy, convert): which side takes which option."""

from __future__ import annotations

import inspect
from typing import Any

from torchstow.plugins.manager import default_registry

__all__ = ["accepted_options", "route_options"]


def accepted_options(uri: str) -> tuple[list[str], bool]:
    """The storage options the backend of ``uri`` takes by name, and whether it takes any other."""
    backend = default_registry().resolve(uri).backend
    params = inspect.signature(backend).parameters.values()
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _describe(uri: str, names: list[str], takes_any: bool) -> str:
    listed = ", ".join(names) or "none"
    return f"{uri} takes {listed}" + (" and any option of its filesystem" if takes_any else "")


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

    Each option of ``common`` goes to each side whose backend takes it by
    name; a backend that passes unknown options on (fsspec's, to its
    filesystem) also gets those the other side does not name. An option no
    side takes is a TypeError naming what each side takes. ``src_only`` and ``dst_only`` go
    to their side unchecked here (the backend checks them). ``dst_backend``
    is False when the destination is a plain file rather than a backend.
    """
    src_names, src_any = accepted_options(src)
    dst_names, dst_any = accepted_options(dst) if dst_backend else ([], False)
    src_opts = dict(src_only or {})
    dst_opts = dict(dst_only or {})
    for key, value in (common or {}).items():
        to_src_named, to_dst_named = key in src_names, key in dst_names
        to_src = to_src_named or (src_any and not to_dst_named)
        to_dst = to_dst_named or (dst_any and not to_src_named)
        if not (to_src or to_dst):
            raise TypeError(
                f"no side takes the storage option {key!r}: "
                f"{_describe(src, src_names, src_any)}; "
                + (
                    _describe(dst, dst_names, dst_any)
                    if dst_backend
                    else f"{dst} is a plain file and takes none"
                )
            )
        if to_src:
            src_opts.setdefault(key, value)
        if to_dst:
            dst_opts.setdefault(key, value)
    return src_opts, dst_opts
