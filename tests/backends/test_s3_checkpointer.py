"""The checkpointer's writers of two ranks commit one checkpoint on S3 (a moto server on 127.0.0.1):
their messages travel as objects under the checkpoint, ordered by a TCPStore barrier."""

from __future__ import annotations

import threading

import s3fs
import torch

import torchstow
from torchstow.checkpointing import (
    CheckpointReader,
    CheckpointWriter,
    CheckpointWriterConfig,
    RankInfo,
    TCPStoreBarrier,
)

from storage_helpers import s3_options, unique


def test_two_ranks_commit_one_checkpoint_on_s3(s3_endpoint: str, s3_bucket: str) -> None:
    parent = f"s3://{s3_bucket}/{unique()}"
    uri = f"{parent}/step-1"
    opts = s3_options(s3_endpoint)
    first = TCPStoreBarrier(0, 2, tcpstore_port=0, timeout_secs=60)
    second = TCPStoreBarrier(1, 2, tcpstore_port=first.store.port, timeout_secs=60)
    config = CheckpointWriterConfig(storage_options=opts)
    errors: list[BaseException] = []

    def write(rank: int, barrier: TCPStoreBarrier) -> None:
        sd = {"shared": torch.arange(8.0), f"own{rank}": torch.full((3,), float(rank)), "step": 1}
        try:
            CheckpointWriter(config, RankInfo(rank, 2), barrier).write(uri, sd)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=args) for args in ((0, first), (1, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert torchstow.latest(parent, storage_options=opts) == uri
    loaded, missing = CheckpointReader(RankInfo(1, 2), storage_options=opts).read(uri)
    assert missing == []
    assert torch.equal(loaded["own0"], torch.zeros(3)) and torch.equal(loaded["own1"], torch.ones(3))
    assert torch.equal(loaded["shared"], torch.arange(8.0))
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, key="testing", secret="testing")
    names = [path.rsplit("/", 1)[-1] for path in fs.ls(uri.removeprefix("s3://"), refresh=True)]
    assert not [name for name in names if name.startswith(".")]  # no message left behind
