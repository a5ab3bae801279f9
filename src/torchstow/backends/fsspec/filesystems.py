"""Which fsspec filesystem serves a URI: its class (with an install hint from
``fsspec.registry`` when its library is missing), the options it takes, and a
per-process cache of instances."""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["filesystem_class", "filesystem_options", "is_s3", "open_filesystem", "split_uri"]

_WRAPPER = "fsspec+"
# torchstow's own extra installs the S3 library; other protocols take fsspec.registry's hint.
_OWN_HINTS = {
    "s3": "pip install 'torchstow[s3]' (installs s3fs)",
    "s3a": "pip install 'torchstow[s3]' (installs s3fs)",
}


def split_uri(uri: str) -> tuple[str, str]:
    """``(protocol, fsspec URL)`` for a checkpoint URI (``fsspec+ftp://h/p`` -> ``ftp``, ``ftp://h/p``)."""
    url = uri[len(_WRAPPER) :] if uri.startswith(_WRAPPER) else uri
    protocol, sep, _ = url.partition("://")
    if not sep or not protocol:
        raise ValueError(f"{uri!r} is not an fsspec URL (protocol://path, or fsspec+protocol://path)")
    return protocol.lower(), url


_cache: dict[tuple[str, str, int], Any] = {}
_cache_lock = threading.Lock()


def is_s3(fs_or_class: Any) -> bool:
    """Whether a filesystem (or its class) is s3fs's."""
    protocol = fs_or_class.protocol
    return "s3" in (protocol if isinstance(protocol, tuple | list) else (protocol,)) and hasattr(
        fs_or_class, "_call_s3"
    )


def _install_hint(protocol: str) -> str | None:
    """How to install ``protocol``'s library: torchstow's extra for S3, else fsspec.registry's hint."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(protocol)
    return _OWN_HINTS.get(protocol) or (known.get("err") if known else None)


def filesystem_class(uri: str) -> Any:
    """The fsspec filesystem class for ``uri``'s protocol; ImportError with an install hint."""
    import fsspec

    protocol, _ = split_uri(uri)
    try:
        return fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        hint = _install_hint(protocol)
        raise ImportError(
            f"{uri!r} needs the fsspec implementation of {protocol!r}, which is not installed"
            + (f": {hint}" if hint else f" ({exc})")
        ) from exc


def filesystem_options(cls: Any) -> list[str]:
    """The keyword options ``cls`` and the fsspec classes it builds on name in their constructors."""
    import inspect

    names = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return sorted(names)


def open_filesystem(uri: str, options: dict[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` built with ``options``, and the path in it.

    Filesystems are cached per process by protocol and options. S3
    filesystems get their own instance whose client does not retry (the
    store's retry policy does), unless ``config_kwargs`` sets ``retries``.
    """
    protocol, url = split_uri(uri)
    from fsspec.utils import tokenize

    cls = filesystem_class(uri)
    kwargs = {**cls._get_kwargs_from_urls(url), **options}
    own_retries = is_s3(cls) and "retries" not in (kwargs.get("config_kwargs") or {})
    if own_retries:
        kwargs["config_kwargs"] = {
            **(kwargs.get("config_kwargs") or {}),
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }
    key = (protocol, tokenize(kwargs), os.getpid())
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _build(cls, kwargs, uri, options)
            if own_retries:
                fs.retries = 1  # s3fs's own retry loop: one pass, the store retries
            _cache[key] = fs
    return fs, cls._strip_protocol(url)


def _build(cls: Any, kwargs: dict[str, Any], uri: str, options: dict[str, Any]) -> Any:
    """A new instance of ``cls``; s3fs's with its client built, so that options it cannot use
    (a value of the wrong type, an endpoint that is no URL, an unknown ``config_kwargs`` key)
    are refused here, naming the options (not their values, which may be secrets), rather
    than as a bare error from inside botocore at the first request."""
    try:
        fs = cls(**kwargs, skip_instance_cache=True)
        if is_s3(fs):
            fs.connect()  # builds the client; no request is sent
    except (TypeError, ValueError, AttributeError) as exc:
        kind = ValueError if isinstance(exc, ValueError) else TypeError
        raise kind(
            f"{uri!r}: {cls.__name__} refused the storage options {sorted(options)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return fs
