"""The base of a byte-level wrapper plugin: ``<scheme>+<inner-uri>`` around any byte-store
backend, each of its stores seen through the wrapper's :class:`ForwardingByteStore`.

What the base settles so a wrapper does not have to:

- **Tuning inherited.** Writers and readers use the inner backend's thread count and
  checksum setting (:meth:`StoreBackend.tuned_by`); the inner store keeps its own part
  size and retry policy, since the wrapper's store forwards to it.
- **Options namespaced.** The wrapper's own options are written ``<scheme>.<name>``
  (``enc.key=...``): they never collide with the inner backend's (s3fs's ``key``); every
  other option goes to the inner backend. An unknown option is a TypeError listing both
  sides' options.
- **Data-only options.** An option in :attr:`data_options` is needed only to read or
  write data files: it is not demanded by what reads only manifests (``ls``, ``info``,
  ``du``); a writer demands them up front, and :meth:`option` (which the wrapper's store
  calls when it touches data) raises when one is missing.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from torchstow.core.storage.backend import Backend, StoreBackend
from torchstow.core.storage.interfaces import StorageWriter
from torchstow.core.storage.store import ByteStore
from torchstow.plugins.manager import accepted_storage_options, default_registry, scheme_of

__all__ = ["REQUIRED", "WrapperBackend", "wrapper_storage_options"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a wrapper option that has none (see :attr:`WrapperBackend.options`)."""


def wrapper_storage_options(inner_uri: str, prefix: str, own: Collection[str]) -> set[str] | None:
    """What a wrapper around ``inner_uri`` takes: its own options ``own``, written
    ``<prefix><name>``, and those of the backend of ``inner_uri`` (None when that one
    takes any name). A wrapper's ``extra_storage_options`` returns this, so the CLI's
    ``-o`` routing gives each option to every side that takes it."""
    inner = accepted_storage_options(default_registry().resolve(inner_uri).backend, inner_uri)
    return None if inner is None else inner | {prefix + name for name in own}


class WrapperBackend(StoreBackend):
    """A wrapper ``<scheme>+<inner-uri>`` whose stores are the inner backend's, wrapped.

    Subclass it, set ``schemes = ("name",)``, declare :attr:`options` (and
    :attr:`data_options`), and implement :meth:`wrap_store`.
    """

    options: ClassVar[Mapping[str, Any]] = {}
    """The wrapper's own options, name -> default (:data:`REQUIRED` for none), given as
    ``<scheme>.<name>`` in ``storage_options`` and the CLI's ``-o``."""
    data_options: ClassVar[frozenset[str]] = frozenset()
    """Those of :attr:`options` needed only to touch data files (a key): checked when used."""

    def __init__(self, **storage_options: Any) -> None:
        super().__init__()
        prefix = self.option_prefix()
        own = {k[len(prefix) :]: v for k, v in storage_options.items() if k.startswith(prefix)}
        unknown = sorted(set(own) - set(self.options))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} does not take the option(s) {[prefix + n for n in unknown]}; "
                f"its own options: {', '.join(prefix + n for n in sorted(self.options)) or 'none'}"
            )
        needed = {n for n, default in self.options.items() if default is REQUIRED} - self.data_options
        missing = sorted(needed - set(own))
        if missing:
            raise TypeError(
                f"{type(self).__name__} needs the storage option(s) {', '.join(prefix + n for n in missing)} "
                f"(on the command line: {' '.join(f'-o {prefix}{n}=VALUE' for n in missing)})"
            )
        self.own_options: dict[str, Any] = {**self.options, **own}
        self.inner_options = {k: v for k, v in storage_options.items() if not k.startswith(prefix)}
        self._inners: dict[str, StoreBackend] = {}

    @classmethod
    def option_prefix(cls) -> str:
        """``<scheme>.``: how the wrapper's own options are written."""
        return f"{cls.schemes[0]}."

    @classmethod
    def split_uri(cls, uri: str) -> str:
        """The inner URI of ``<scheme>+<inner-uri>``; a ValueError when the inner URI applies
        this wrapper again (``enc+enc+file://``): the layers' options (``<scheme>.<name>``)
        could not be told apart."""
        head, plus, inner = uri.partition("+")
        if not plus or head.lower() not in cls.schemes or "://" not in inner:
            raise ValueError(
                f"{uri!r} is not a {cls.schemes[0]}+<inner-uri> URI (e.g. {cls.schemes[0]}+file:///dir)"
            )
        again = set(scheme_of(inner).split("+")) & set(cls.schemes)
        if again:
            raise ValueError(
                f"{uri!r} applies the wrapper {sorted(again)[0]}+ more than once; each wrapper may "
                f"appear once in a URI, since its options ({cls.option_prefix()}<name>) could not "
                f"be told apart between the layers"
            )
        return inner

    @classmethod
    def extra_storage_options(cls, uri: str) -> set[str] | None:
        """The wrapper's own options (``<scheme>.<name>``) and the inner backend's."""
        return wrapper_storage_options(cls.split_uri(uri), cls.option_prefix(), cls.options)

    def option(self, name: str) -> Any:
        """The value of the wrapper's option ``name``; a TypeError naming it when it is a
        data-only option that was not given (and has no default)."""
        value = self.own_options[name]
        if value is REQUIRED:
            flag = self.option_prefix() + name
            raise TypeError(
                f"{type(self).__name__} needs the storage option {flag} to read or write data "
                f"(on the command line: -o {flag}=VALUE)"
            )
        return value

    def _data_options_given(self) -> None:
        for name in sorted(self.data_options):
            self.option(name)

    def storage_writer(self, uri: str, *, overwrite: bool = False) -> StorageWriter:
        """The layout's writer on the wrapped store; a TypeError first when a data-only
        option is missing (a reader opens without them: it may read only the manifest, and
        :meth:`option` fails the first read of data)."""
        self._data_options_given()
        return super().storage_writer(uri, overwrite=overwrite)

    def inner_backend(self, uri: str) -> tuple[str, StoreBackend]:
        """The inner URI of ``uri`` and the byte-store backend serving it (built once per scheme)."""
        inner_uri = self.split_uri(uri)
        scheme = scheme_of(inner_uri)
        backend = self._inners.get(scheme)
        if backend is None:
            built: Backend = default_registry().backend_for(inner_uri, self.inner_options)
            if not isinstance(built, StoreBackend):
                raise ValueError(
                    f"{uri!r}: {type(self).__name__} wraps byte-store backends; "
                    f"{type(built).__name__} ({scheme}://) is not one"
                )
            backend = self._inners[scheme] = built
        return inner_uri, backend

    @abc.abstractmethod
    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        """``store`` (the inner backend's, for the wrapper URI ``uri``) as the wrapper shows it:
        a :class:`ForwardingByteStore` subclass."""

    def open_store(self, uri: str) -> ByteStore:
        inner_uri, backend = self.inner_backend(uri)
        return self.wrap_store(backend.open_store(inner_uri), uri)

    def tuned_by(self, uri: str) -> StoreBackend:
        inner_uri, backend = self.inner_backend(uri)
        return backend.tuned_by(inner_uri)

    def list_children(self, prefix: str) -> list[str]:
        inner_prefix, backend = self.inner_backend(prefix)
        head = prefix[: len(prefix) - len(inner_prefix)]
        return [head + child for child in backend.list_children(inner_prefix)]
