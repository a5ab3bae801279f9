"""What the three conformance kits share: the scheme under test, where its
checkpoints go, and the options every call passes."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from torchstow.testing._internals import scheme_of

__all__ = ["ConformanceBase"]


class ConformanceBase:
    """Fixtures every kit class has; a subclass sets ``scheme`` and overrides fixtures."""

    scheme: ClassVar[str] = ""
    exclusive_commits: ClassVar[bool] = True
    """False where the medium has no exclusive create: the kits then skip the races of
    ``publish_new`` (byte-store kit) and of two saves creating one checkpoint (end to end)."""

    @pytest.fixture
    def root_uri(self, tmp_path: Any) -> str:
        """A fresh, empty prefix for one test; checkpoints (or stores) go directly under it."""
        return f"{self.scheme}://{tmp_path}"

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        """Options passed to every torchstow call of the tests (endpoints, credentials)."""
        return {}

    @pytest.fixture(autouse=True)
    def _scheme_matches(self, root_uri: str) -> None:
        assert self.scheme, f"{type(self).__name__} must set the scheme it tests"
        assert scheme_of(root_uri) == self.scheme, (
            f"root_uri {root_uri!r} does not use scheme {self.scheme!r}"
        )

    @staticmethod
    def uri(root: str, name: str) -> str:
        """``name`` directly under the prefix ``root``."""
        return f"{root.rstrip('/')}/{name}"
