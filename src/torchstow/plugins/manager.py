"""Plugin discovery and URI -> backend resolution.

:func:`get_plugin_manager` builds a fresh pluggy manager and loads the
``torchstow.backends`` entry points (our built-in backends are declared there
exactly as a third party's are). :class:`BackendRegistry` asks every plugin
to register its backend classes and maps URI schemes to them.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import pluggy

from torchstow.core.backend import Backend
from torchstow.core.errors import TorchstowError, UnknownBackendError
from torchstow.plugins import hookspecs

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "BackendEntry",
    "BackendRegistry",
    "PluginConflictError",
    "default_registry",
    "get_plugin_manager",
    "reset_default_registry",
    "scheme_of",
]

ENTRY_POINT_GROUP = "torchstow.backends"
DISABLE_ENV = "TORCHSTOW_DISABLE_PLUGINS"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class PluginConflictError(TorchstowError):
    """Two plugins claim the same URI scheme and neither is preferred."""


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``TORCHSTOW_DISABLE_PLUGINS`` (comma separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager() -> pluggy.PluginManager:
    """A new plugin manager with the hook specs and every enabled entry-point plugin."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def scheme_of(uri: str) -> str:
    """The scheme of ``uri``, lowercased; plain paths are ``"file"``."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


@dataclass(frozen=True)
class BackendEntry:
    """One registered scheme: the backend class and the plugin that provided it."""

    scheme: str
    backend: type[Backend]
    plugin: str
    version: str | None
    preferred: bool = False


class BackendRegistry:
    """Schemes -> backend classes, as the plugins of ``pm`` registered them."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        versions = {pm.get_name(plugin): dist.version for plugin, dist in pm.list_plugin_distinfo()}
        self._entries: dict[str, BackendEntry] = {}
        for impl in pm.hook.torchstow_register_backends.get_hookimpls():
            plugin = impl.plugin_name
            version = versions.get(plugin)

            def register(
                backend: type[Backend], *, preferred: bool = False, _p: str = plugin, _v: Any = version
            ) -> None:
                self._add(backend, _p, _v, preferred)

            impl.function(register=register)

    def _add(self, backend: type[Backend], plugin: str, version: str | None, preferred: bool) -> None:
        if not (isinstance(backend, type) and issubclass(backend, Backend)):
            raise TypeError(
                f"plugin {plugin!r} registered {backend!r}, which is not a torchstow Backend class"
            )
        if not backend.schemes:
            raise ValueError(f"plugin {plugin!r} registered {backend.__name__} with no schemes")
        for raw in backend.schemes:
            scheme = raw.lower()
            entry = BackendEntry(scheme, backend, plugin, version, preferred)
            current = self._entries.get(scheme)
            if current is None or current.backend is backend or (preferred and not current.preferred):
                self._entries[scheme] = entry
            elif current.preferred and not preferred:
                continue
            else:
                raise PluginConflictError(
                    f"the scheme {scheme!r} is claimed by plugin {current.plugin!r} "
                    f"({current.backend.__name__}) and plugin {plugin!r} ({backend.__name__}); "
                    f"uninstall one, block one with {DISABLE_ENV}={plugin}, or register one "
                    "with preferred=True"
                )

    @property
    def entries(self) -> dict[str, BackendEntry]:
        """Every registered scheme."""
        return dict(self._entries)

    def resolve(self, uri: str) -> BackendEntry:
        """The entry serving ``uri``; ``a+b://`` falls back to a wrapper scheme ``a``."""
        scheme = scheme_of(uri)
        entry = self._entries.get(scheme)
        if entry is None and "+" in scheme:
            entry = self._entries.get(scheme.split("+", 1)[0])
        if entry is None:
            installed = ", ".join(sorted(self._entries)) or "none"
            raise UnknownBackendError(
                f"no installed torchstow backend handles {uri!r} (scheme {scheme!r}); "
                f"installed schemes: {installed}. Install the plugin that provides {scheme!r}, "
                f"or check that it is not blocked by {DISABLE_ENV}."
            )
        return entry

    def backend_for(self, uri: str, storage_options: dict[str, Any] | None = None) -> Backend:
        """An instance of the backend for ``uri``, built with ``storage_options``."""
        backend = self.resolve(uri).backend
        options = storage_options or {}
        try:
            inspect.signature(backend).bind(**options)
        except TypeError:
            params = [
                p.name
                for p in inspect.signature(backend).parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            raise TypeError(
                f"{backend.__name__} ({uri!r}) does not take the storage options "
                f"{sorted(options)}; it takes: {', '.join(params) or 'none'}"
            ) from None
        return backend(**options)


_default: BackendRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> BackendRegistry:
    """The registry of the installed plugins, built on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = BackendRegistry(get_plugin_manager())
        return _default


def reset_default_registry() -> None:
    """Forget the cached registry (after installing or disabling plugins)."""
    global _default
    with _default_lock:
        _default = None
