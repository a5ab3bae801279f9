"""torchstow's conformance suite, adopted by the plugin."""

import pytest

from torchstow.testing import BackendConformance


class TestSqliteStore(BackendConformance):
    scheme = "sqlite"

    @pytest.fixture
    def root_uri(self, tmp_path):
        return f"sqlite://{tmp_path}/checkpoints.db/run"
