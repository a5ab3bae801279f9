"""torchstow's conformance kits, adopted by the wrapper: one line each, plus where the
checkpoints go and the key. A wrapper's kit ``scheme`` is the compound one it serves,
``enc+file``, not ``enc``."""

import pytest

from torchstow.testing import (
    BackendConformance,
    ByteStoreConformance,
    DistributedBackendConformance,
    WrapperConformance,
)

KEY = "00112233445566778899aabbccddeeff" * 2


class EncFile:
    scheme = "enc+file"

    @pytest.fixture
    def root_uri(self, tmp_path):
        return f"enc+file://{tmp_path}/run"

    @pytest.fixture
    def storage_options(self):
        return {"enc.key": KEY, "enc.block_size": 64 << 10}  # small blocks: reads cross them


class TestEncStore(EncFile, BackendConformance):
    """End to end: save, load, list, damage, delete."""


class TestEncByteStore(EncFile, ByteStoreConformance):
    """The byte-store contract, called directly on the encrypting store."""


class TestEncDistributed(EncFile, DistributedBackendConformance):
    """Two processes saving one checkpoint."""


class TestEncWrapper(EncFile, WrapperConformance):
    """The wrapper's own rules: ciphertext at rest, no capability leaked, the inner backend's
    tuning, and faulty+enc+file:// composing."""
