"""Plugin discovery and URI -> backend resolution.

:func:`get_plugin_manager` builds a fresh pluggy manager and loads the
``torchstow.backends`` entry points (our built-in backends are declared there
exactly as a third party's are). :class:`BackendRegistry` asks every plugin
to register its backend classes and maps URI schemes to them.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import re
import threading
import types
import typing
from dataclasses import dataclass
from typing import Any

import pluggy

from torchstow.core.storage.backend import Backend
from torchstow.errors import PluginConflictError, UnknownBackendError
from torchstow.plugins import hookspecs

__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "BackendEntry",
    "BackendRegistry",
    "PluginConflictError",
    "PluginManager",
    "check_option_types",
    "default_registry",
    "get_plugin_manager",
    "open_backend",
    "reset_default_registry",
    "scheme_of",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "torchstow.backends"
DISABLE_ENV = "TORCHSTOW_DISABLE_PLUGINS"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_SCHEME_ONLY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(?!//)")
_WRAPPER_ONLY = re.compile(r"^([A-Za-z][A-Za-z0-9.\-]*)\+(?![A-Za-z][A-Za-z0-9+.\-]*:)")


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``TORCHSTOW_DISABLE_PLUGINS`` (comma separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager for the torchstow hooks, remembering what loading found.

    ``versions`` and ``distributions`` map each plugin loaded from an entry
    point to its distribution's version and name; ``load_errors`` maps each
    plugin that failed to import to the error, so one broken plugin does not
    take the others down.
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.versions: dict[str, str] = {}
        self.distributions: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every plugin of ``group`` that is not blocked."""
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != group or self.is_blocked(ep.name):
                    continue
                if self.has_plugin(ep.name) or ep.name in self.load_errors:
                    first = self.distributions.get(ep.name)
                    if first != dist.metadata["Name"]:
                        # Which one loads depends on sys.path's order: say so where a missing
                        # scheme is reported (its schemes may be the ones a user needs).
                        why = f"ignored: the plugin of {first} loaded first has the same name {ep.name!r}"
                        self.load_errors[f"{ep.name} ({dist.metadata['Name']})"] = why
                        logger.warning("torchstow plugin %r of %s %s", ep.name, dist.metadata["Name"], why)
                    continue
                self.distributions[ep.name] = dist.metadata["Name"]
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                    logger.warning("torchstow plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
                    continue
                try:
                    self.register(plugin, name=ep.name)
                    self.check_pending()
                except pluggy.PluginValidationError as exc:
                    self.unregister(name=ep.name)
                    self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                    logger.warning("torchstow plugin %r (%s) is invalid: %s", ep.name, ep.value, exc)
                    continue
                self.versions[ep.name] = dist.version


def get_plugin_manager() -> PluginManager:
    """A new plugin manager with the hook specs and every enabled entry-point plugin."""
    pm = PluginManager()
    for name in disabled_plugins():
        pm.set_blocked(name)
    pm.load_entry_points()
    return pm


def scheme_of(uri: str) -> str:
    """The scheme of ``uri``, lowercased; plain paths are ``"file"``."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


@dataclass(frozen=True)
class BackendEntry:
    """One registered scheme: the backend class and the plugin that provided it.

    ``plugin`` is the entry-point name (what ``TORCHSTOW_DISABLE_PLUGINS``
    takes); ``distribution`` and ``version`` name the installed package it
    came from (None for a plugin registered by hand).
    """

    scheme: str
    backend: type[Backend]
    plugin: str
    version: str | None
    preferred: bool = False
    distribution: str | None = None


class BackendRegistry:
    """Schemes -> backend classes, as the plugins of ``pm`` registered them.

    A plugin whose hook raises is left out (and listed in ``load_errors``),
    like one that failed to import; a scheme conflict is an error.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.versions: dict[str, str] = dict(getattr(pm, "versions", {}))
        self.distributions: dict[str, str] = dict(getattr(pm, "distributions", {}))
        self.load_errors: dict[str, str] = dict(getattr(pm, "load_errors", {}))
        self._entries: dict[str, BackendEntry] = {}
        pm.check_pending()  # a hook implementation no spec knows (a misspelled name) is an error
        impls = pm.hook.torchstow_register_backends.get_hookimpls()
        hooked = {impl.plugin_name for impl in impls}
        for name in self.versions.keys() - hooked:  # loaded from an entry point, with no hook
            self.load_errors[name] = "defines no torchstow_register_backends hook: it registers nothing"
            logger.warning("torchstow plugin %r defines no torchstow_register_backends hook", name)
        for impl in impls:
            plugin = impl.plugin_name
            version = self.versions.get(plugin)
            added: list[tuple[type[Backend], bool]] = []

            def register(
                backend: type[Backend], *, preferred: bool = False, _added: list[Any] = added
            ) -> None:
                _added.append((backend, preferred))

            # Through pluggy's hook calling (tracing, monitoring, wrappers), one plugin at a
            # time: a plugin whose hook raises is left out, and the others still register.
            others = [other.plugin for other in impls if other is not impl]
            only_this = pm.subset_hook_caller("torchstow_register_backends", remove_plugins=others)
            try:
                returned = [r for r in only_this(register=register) if r is not None]
            except Exception as exc:
                self.load_errors[plugin] = f"torchstow_register_backends raised {type(exc).__name__}: {exc}"
                logger.warning("torchstow plugin %r failed to register its backends: %s", plugin, exc)
                continue
            if not added:
                # A hook that returns its classes (as other plugin systems' do) registers nothing.
                hint = f" (it returned {returned[0]!r}: call register(cls) instead)" if returned else ""
                self.load_errors[plugin] = f"torchstow_register_backends registered no backend{hint}"
                logger.warning("torchstow plugin %r registered no backend%s", plugin, hint)
            wrong = next((why for why in map(_not_registrable, (b for b, _ in added)) if why), None)
            if wrong is not None:  # left out whole, like a hook that raised
                self.load_errors[plugin] = f"torchstow_register_backends registered {wrong}"
                logger.warning("torchstow plugin %r registered %s", plugin, wrong)
                continue
            for backend, preferred in added:
                self._add(backend, plugin, version, preferred)

    def _add(self, backend: type[Backend], plugin: str, version: str | None, preferred: bool) -> None:
        for raw in backend.schemes:
            scheme = raw.lower()
            entry = BackendEntry(scheme, backend, plugin, version, preferred, self.distributions.get(plugin))
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

    def available(self) -> list[BackendEntry]:
        """The registered schemes, sorted by scheme."""
        return [self._entries[scheme] for scheme in sorted(self._entries)]

    def _entry(self, scheme: str) -> BackendEntry | None:
        entry = self._entries.get(scheme)
        if entry is None and "+" in scheme:
            entry = self._entries.get(scheme.split("+", 1)[0])
        return entry

    def canonical_uri(self, uri: str) -> str:
        """``uri`` as backends take it: its scheme lowercased (schemes are
        case-insensitive, RFC 3986: ``S3://b/x`` is ``s3://b/x``), and ``file:/path``
        (RFC 8089's short form) as ``file:///path``. A registered scheme followed by
        ``:`` but not ``//`` (``s3:/bucket/x``, ``s3:bucket``) is an
        :class:`UnknownBackendError`: it must never become a local path; so is a registered
        scheme followed by ``+`` and no URI (``faulty+/dir/x``), which names the intended
        ``faulty+file:///dir/x``."""
        match = _SCHEME.match(uri)
        if match:
            return match.group(1).lower() + uri[len(match.group(1)) :]
        wrapper = _WRAPPER_ONLY.match(uri)
        if wrapper is not None and self._entry(wrapper.group(1).lower()) is not None:
            scheme, rest = wrapper.group(1).lower(), uri[wrapper.end() :]
            path = rest if rest.startswith("/") else os.path.abspath(rest)
            raise UnknownBackendError(
                f"{uri!r} is not a URI ({scheme}+ wraps a URI with a scheme): write "
                f"{scheme}+file://{path}, or ./{uri} for a local path"
            )
        match = _SCHEME_ONLY.match(uri)
        if match is None or len(match.group(1)) == 1:  # a plain path (C:/ is a Windows drive)
            return uri
        scheme, rest = match.group(1).lower(), uri[match.end() :]
        if scheme == "file":
            if not rest.startswith("/"):
                raise UnknownBackendError(f"{uri!r}: a file: URI needs an absolute path (file:///dir/ckpt)")
            return "file://" + rest
        if self._entry(scheme) is None:
            return uri  # a local name with a colon in it
        path = rest if scheme.split("+")[-1] == "file" else rest.lstrip("/")
        raise UnknownBackendError(
            f"{uri!r} is not a URI ({scheme} URIs start {scheme}://): "
            f"write {scheme}://{path}, or ./{uri} for a local path"
        )

    def resolve(self, uri: str) -> BackendEntry:
        """The entry serving ``uri``; ``a+b://`` falls back to a wrapper scheme ``a``.

        ``uri`` must be as :meth:`canonical_uri` writes it; one that is not (an
        upper-case scheme, ``s3:/bucket``) raises :class:`UnknownBackendError`
        saying how to write it.
        """
        canonical = self.canonical_uri(uri)
        if canonical != uri:
            raise UnknownBackendError(f"write {uri!r} as {canonical!r} (the form torchstow's backends take)")
        scheme = scheme_of(uri)
        entry = self._entry(scheme)
        if entry is None:
            installed = ", ".join(sorted(self._entries)) or "none"
            notes = ""
            if self.load_errors:
                broken = "; ".join(f"{name}: {err}" for name, err in sorted(self.load_errors.items()))
                notes += f" Plugins that failed to load: {broken}."
            blocked = sorted(disabled_plugins())
            if blocked:
                notes += f" Blocked by {DISABLE_ENV}: {', '.join(blocked)}."
            raise UnknownBackendError(
                f"no installed torchstow backend handles {uri!r} (scheme {scheme!r}); "
                f"installed schemes: {installed}. Install the plugin that provides {scheme!r}, "
                f"or check that it is not blocked by {DISABLE_ENV}.{notes}"
            )
        return entry

    def backend_for(self, uri: str, storage_options: dict[str, Any] | None = None) -> Backend:
        """An instance of the backend for ``uri``, built with ``storage_options``."""
        entry = self.resolve(uri)
        backend = entry.backend
        options = storage_options or {}
        if options:  # none given: nothing to check (and no signature to inspect)
            accepted = accepted_storage_options(backend, uri)
            if accepted is not None and not accepted.issuperset(options):
                unknown = sorted(set(options) - accepted)
                raise TypeError(
                    f"{backend.__name__} ({uri!r}) does not take the storage options "
                    f"{unknown}; it takes: {', '.join(sorted(accepted)) or 'none'}"
                )
        check_option_types(backend, uri, options)
        try:
            return backend(**options)
        except TypeError as exc:
            missing = required_storage_options(backend) - set(options)
            if not missing:
                exc.add_note(_made_by(entry, uri))
                raise
            needed = ", ".join(sorted(missing))
            flags = " ".join(f"-o {name}=VALUE" for name in sorted(missing))
            raise TypeError(
                f"{backend.__name__} ({uri!r}) needs the storage option(s) {needed}: pass "
                f"storage_options={{{', '.join(repr(n) + ': ...' for n in sorted(missing))}}} "
                f"(on the command line: {flags})"
            ) from exc
        except Exception as exc:  # the plugin's own error (a missing client library, credentials)
            exc.add_note(_made_by(entry, uri))
            raise


def _made_by(entry: BackendEntry, uri: str) -> str:
    """Who raised while a backend was made for ``uri``: its class and plugin."""
    source = " ".join(p for p in (entry.distribution, entry.version) if p) or "registered by hand"
    made = entry.backend.__name__
    return f"raised making {made} for {uri!r}: the backend of plugin {entry.plugin!r} ({source})"


def _not_registrable(backend: Any) -> str | None:
    """Why ``backend`` cannot be registered (not a Backend class, no schemes, a scheme that
    is no URI scheme), or None."""
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        return f"{backend!r}, which is not a torchstow Backend class"
    schemes = backend.schemes
    if not schemes or isinstance(schemes, str):
        return f"{backend.__name__} with schemes={schemes!r}: it needs a tuple of scheme names"
    bad = [s for s in schemes if not (isinstance(s, str) and _SCHEME.match(s + "://"))]
    if bad:
        return f"{backend.__name__} with schemes {bad!r}, which are no URI schemes"
    return None


def required_storage_options(backend: type[Backend]) -> set[str]:
    """The storage options ``backend`` cannot be built without (keyword parameters without a default)."""
    params = inspect.signature(backend).parameters.values()
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name for p in params if p.kind in named and p.default is inspect.Parameter.empty}


def accepted_storage_options(backend: type[Backend], uri: str) -> set[str] | None:
    """The storage options ``backend`` takes for ``uri``: its constructor's named
    keyword parameters, plus what it passes on through ``**kwargs``
    (:meth:`Backend.extra_storage_options`); None when it takes any name."""
    params = inspect.signature(backend).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        extra = backend.extra_storage_options(uri)
        if extra is None:
            return None
        names.update(extra)
    return names


_CHECKED_TYPES = (bool, int, float, str, type(None))


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (``int | None`` -> int, None), or None
    when it names anything else (the backend checks those itself)."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    allowed = args or (annotation,)
    if not all(t in _CHECKED_TYPES for t in allowed):
        return None
    return tuple(allowed)


def _fits(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


def check_option_types(backend: type[Backend], uri: str, options: dict[str, Any]) -> None:
    """A TypeError naming the option when a value has a type its parameter's annotation
    does not allow (``-o thread_count=abc``); options annotated with other types, or
    passed on through ``**kwargs``, are left to the backend."""
    if not options:
        return  # resolving the annotations costs about 0.1 ms per call
    try:
        hints = typing.get_type_hints(backend.__init__)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return
    for key, value in options.items():
        allowed = _allowed_types(hints[key]) if key in hints else None
        if allowed is not None and not _fits(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise TypeError(
                f"the storage option {key} of {backend.__name__} ({uri!r}) must be {names}, "
                f"got {value!r} ({type(value).__name__})"
            )


def open_backend(uri: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """The backend that serves ``uri`` among the installed plugins, built with
    ``storage_options``: what a wrapper backend uses to reach the one it wraps."""
    return default_registry().backend_for(uri, storage_options)


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
