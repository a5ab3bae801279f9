"""Calling storage methods with the keywords they accept.

DCP-style storage classes often declare ``set_up_storage_writer(self,
is_coordinator)`` without ``rank=`` or ``world_size=``; DCP passes those only
to methods that accept them, and so does torchstow.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["call_with_accepted"]


@functools.lru_cache(maxsize=256)
def _accepted(fn: Callable[..., Any]) -> tuple[bool, frozenset[str]]:
    """(takes ``**kwargs``, the names it takes as keywords) of ``fn``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to inspect: pass everything
        return True, frozenset()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = frozenset(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return var_kw, named


def call_with_accepted(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``method(*args, **kwargs)``, dropping the keywords it does not accept."""
    key = getattr(method, "__func__", method)
    var_kw, named = _accepted(key)
    if not var_kw:
        kwargs = {name: value for name, value in kwargs.items() if name in named}
    return method(*args, **kwargs)
