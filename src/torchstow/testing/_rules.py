"""Kit failures that name the rule a backend broke and how to fix it.

Each kit test is decorated with :func:`rule`: whatever makes the test fail
(a failed check, an unexpected exception from the store) is reported as
``rule broken: <rule>`` followed by what went wrong and ``how to fix: <fix>``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

__all__ = ["broken", "rule"]

F = TypeVar("F", bound=Callable[..., Any])


def broken(rule_text: str, what: str, fix: str) -> str:
    """The message of a kit failure: the rule, what went wrong, how to fix it."""
    return f"rule broken: {rule_text}\n{what}\nhow to fix: {fix}"


def rule(rule_text: str, fix: str) -> Callable[[F], F]:
    """Report any failure of the decorated kit test as a break of ``rule_text``, fixed by ``fix``.

    Skips and pytest's own outcomes pass through; a message that already names
    a rule (from :func:`broken`) is kept as it is.
    """

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return test(*args, **kwargs)
            except (Exception, pytest.fail.Exception) as exc:  # pytest.raises that saw nothing fails
                checked = isinstance(exc, (AssertionError, pytest.fail.Exception))
                what = str(exc) if checked else f"{type(exc).__name__}: {exc}"
                if what.startswith("rule broken: "):
                    raise
                raise AssertionError(broken(rule_text, what or type(exc).__name__, fix)) from exc

        return run  # type: ignore[return-value]

    return decorate
