"""The plugin contract: the hooks a torchstow plugin may implement.

A plugin is a module (or object) exposed through the ``torchstow.backends``
entry-point group, with functions decorated by :data:`hookimpl`::

    from torchstow import hookimpl

    @hookimpl
    def torchstow_register_backends(register):
        register(MyBackend)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from torchstow.core.backend import Backend

PROJECT = "torchstow"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "Register", "hookimpl", "hookspec", "torchstow_register_backends"]


class Register(Protocol):
    """The callable a plugin receives to register its backend classes."""

    def __call__(self, backend: type[Backend], *, preferred: bool = False) -> None:
        """Register ``backend`` for each scheme in ``backend.schemes``.

        ``preferred=True`` wins a scheme another plugin also claims.
        """


@hookspec
def torchstow_register_backends(register: Register) -> None:
    """Register backend classes by calling ``register(BackendClass)``.

    Called once when the plugin manager is built. Each class lists the URI
    schemes it serves in its ``schemes`` attribute.
    """
