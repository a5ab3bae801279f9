"""The ``torchstow`` command (entry point :func:`main`)."""

from torchstow.cli.app import main

__all__ = ["main"]
