"""Mirrors of DCP's ``torch.distributed.checkpoint._experimental``, by URI: the
checkpointers and their factories and configs, the stagers, the barriers, the
writer process, replication, and the async save pipeline.

These classes keep DCP's own keyword names (a location is ``path`` here, as in
DCP; ``CheckpointReader.read`` and ``Checkpointer.load`` default to
``strict=False`` as DCP's do), so code written against DCP's experimental API
switches by one import: ``from torchstow.checkpointing import ...``.
"""

from torchstow.checkpointing.async_save import AsyncSave
from torchstow.checkpointing.barriers import (
    Barrier,
    BarrierConfig,
    DistBarrier,
    TCPStoreBarrier,
    register_barrier,
)
from torchstow.checkpointing.checkpoint_io import (
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    WriterHook,
)
from torchstow.checkpointing.checkpointer import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointerConfig,
    SyncCheckpointer,
    make_async_checkpointer,
    make_sync_checkpointer,
)
from torchstow.checkpointing.rank_info import RankInfo
from torchstow.checkpointing.replication import ReplicationStager
from torchstow.checkpointing.writer_process import (
    CheckpointProcess,
    CheckpointProcessConfig,
    WriterProcessError,
    WriterProcessTimeoutError,
)
from torchstow.core.staging.stager import CheckpointStagerConfig, DefaultStager, StateDictStager

__all__ = [
    "AsyncCheckpointer",
    "AsyncSave",
    "Barrier",
    "BarrierConfig",
    "CheckpointProcess",
    "CheckpointProcessConfig",
    "CheckpointReader",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "DefaultStager",
    "DistBarrier",
    "RankInfo",
    "ReplicationStager",
    "StateDictStager",
    "SyncCheckpointer",
    "TCPStoreBarrier",
    "WriterHook",
    "WriterProcessError",
    "WriterProcessTimeoutError",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "register_barrier",
]
