"""The plugin contract: every hook a torchstow plugin may implement.

A plugin is a module (or any object) named by an entry point in the
``torchstow.backends`` group of its distribution's metadata::

    # pyproject.toml
    [project.entry-points."torchstow.backends"]
    mystore = "mystore_torchstow"

and defining hook functions decorated with :data:`hookimpl`, which plugin
authors import from ``torchstow.spi``::

    from torchstow.spi import hookimpl

    @hookimpl
    def torchstow_register_backends(register):
        register(MyStoreBackend)

The entry-point name (``mystore``) is the plugin's name: what
``TORCHSTOW_DISABLE_PLUGINS`` and error messages use. torchstow's own
backends are plugins declared the same way. A plugin module should import
only what registering needs; heavy client libraries belong inside the
backend's methods, imported when its scheme is first used.

This module is the whole contract: each hook below is a ``torchstow_*``
function with typed parameters and a docstring saying when it is called and
what it must do. ``docs/plugins.md`` is the tutorial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from torchstow.core.storage.backend import Backend

PROJECT = "torchstow"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "Register", "hookimpl", "hookspec", "torchstow_register_backends"]


class Register(Protocol):
    """The callable a plugin receives to register its backend classes."""

    def __call__(self, backend: type[Backend], *, preferred: bool = False) -> None:
        """Register ``backend`` for each scheme in ``backend.schemes``.

        ``backend`` must be a subclass of :class:`torchstow.spi.Backend` (usually
        of :class:`torchstow.spi.StoreBackend`) naming at least one scheme in a tuple
        of URI schemes; anything else disables this plugin (none of its classes is
        registered), as a hook that raises does.
        ``preferred=True`` wins a scheme that another, non-preferred plugin
        also claims (a built-in one included); two plugins claiming one scheme
        without exactly one of them preferred is a
        :class:`torchstow.PluginConflictError` naming both.
        """


@hookspec
def torchstow_register_backends(register: Register) -> None:
    """Register this plugin's backend classes by calling ``register(BackendClass)``.

    Called once each time torchstow builds its registry of backends: on the
    first save/load/list call of a process, and again after
    ``torchstow.plugins.manager.reset_default_registry()``. It must only
    register classes, quickly and without I/O: the backends are instantiated
    later, per call, with the caller's ``storage_options`` as keyword
    arguments. An exception raised here disables this plugin alone (the
    error is logged and shown by ``torchstow backends``); so does returning the
    classes instead of registering them.
    """
