"""torchstow's conformance kits, adopted by the plugin: one line each, plus where the
checkpoints go."""

import pytest

from torchstow.testing import BackendConformance, ByteStoreConformance, DistributedBackendConformance


class Sqlite:
    scheme = "sqlite"

    @pytest.fixture
    def root_uri(self, tmp_path):
        return f"sqlite://{tmp_path}/checkpoints.db/run"


class TestSqliteStore(Sqlite, BackendConformance):
    """End to end: save, load, list, damage, delete."""


class TestSqliteByteStore(Sqlite, ByteStoreConformance):
    """The byte-store contract, called directly."""


class TestSqliteDistributed(Sqlite, DistributedBackendConformance):
    """Two processes saving one checkpoint into the same database file."""
