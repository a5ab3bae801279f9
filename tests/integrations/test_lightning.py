"""A real Lightning Trainer fits, prunes and resumes through the torchstow CheckpointIO plugins."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import torchstow
from torchstow.integrations.lightning import (
    AsyncTorchstowCheckpointIO,
    TorchstowCheckpointIO,
    last_checkpoint,
)
from torchstow.testing import run_ranks


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.steps = 0
        self.start_weight: torch.Tensor | None = None

    def on_train_start(self) -> None:
        self.start_weight = self.layer.weight.detach().clone()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        gen = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(
            torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(root: str, io: Any, max_steps: int, **checkpoint: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        plugins=[io],
        max_steps=max_steps,
        callbacks=[ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=1, **checkpoint)],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _names(root: str, options: dict[str, Any]) -> list[str]:
    found = torchstow.list_checkpoints(f"{root}/checkpoints", storage_options=options)
    return sorted(info.uri.rsplit("/", 1)[1] for info in found)


@pytest.fixture(params=["local", "shm", "s3"])
def run(
    request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, Any]]:
    """``(default_root_dir, storage options)`` on each backend."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    if request.param == "shm":
        monkeypatch.setenv("TORCHSTOW_SHM_DIR", request.getfixturevalue("shm_dir"))
        return "shm://run", {}
    return request.getfixturevalue("s3_run")


@pytest.mark.slow
@pytest.mark.parametrize("plugin", [TorchstowCheckpointIO, AsyncTorchstowCheckpointIO])
def test_fit_prunes_and_resumes_from_last(run: tuple[str, dict[str, Any]], plugin: Any) -> None:
    root, options = run
    first = Tiny()
    io = plugin(options)
    _trainer(root, io, 3, save_top_k=1, save_last=True).fit(first)
    io.teardown()
    assert _names(root, options) == ["epoch=1-step=3.ckpt", "last.ckpt"]
    saved = torchstow.read(f"{root}/checkpoints/last.ckpt", storage_options=options)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["layer.weight"], first.layer.weight.detach())

    resumed = Tiny()
    trainer = _trainer(root, plugin(options), 5, save_top_k=1, save_last=True)
    # Lightning resolves "last" with fsspec, whose s3:// listings lose the scheme.
    last = "last" if not root.startswith("s3://") else last_checkpoint(f"{root}/checkpoints", options)
    assert last in ("last", f"{root}/checkpoints/last.ckpt")
    trainer.fit(resumed, ckpt_path=last)
    assert resumed.steps == 2 and trainer.global_step == 5  # steps 4 and 5, after the 3 restored
    assert resumed.start_weight is not None
    assert torch.equal(resumed.start_weight, saved["state_dict"]["layer.weight"])
    assert _names(root, options) == ["epoch=2-step=5.ckpt", "last.ckpt"]


def _ddp_fit(
    rank: int,
    world_size: int,
    root: str,
    options: dict[str, Any],
    plugin: str,
    env: dict[str, str],
    max_steps: int,
    resume: str | None,
) -> dict[str, Any]:
    """One rank of a 2-process DDP run on the CPU, in the gloo group run_ranks made (Lightning
    finds it initialized and uses it); returns what rank 0 and the others saw."""
    import fsspec

    os.environ.update(env)
    os.environ.update(
        {
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29400",
        }
    )
    if root.startswith("s3://"):
        fsspec.config.conf["s3"] = dict(options)
    io = {"sync": TorchstowCheckpointIO, "async": AsyncTorchstowCheckpointIO}[plugin](options)
    model = Tiny()
    trainer = pl.Trainer(
        default_root_dir=root,
        plugins=[io],
        strategy="ddp",
        devices=world_size,
        num_nodes=1,
        max_steps=max_steps,
        callbacks=[
            ModelCheckpoint(
                dirpath=f"{root}/checkpoints", every_n_train_steps=1, save_top_k=1, save_last=True
            )
        ],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=resume)
    io.teardown()
    return {
        "steps": model.steps,
        "global_step": trainer.global_step,
        "weight": model.layer.weight.detach().tolist(),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "plugin"), [("local", "sync"), ("shm", "async"), ("s3", "sync")])
def test_ddp_two_processes_fit_prune_and_resume(
    backend: str, plugin: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    env: dict[str, str] = {}
    options: dict[str, Any] = {}
    if backend == "local":
        root = str(tmp_path / "run")
    elif backend == "shm":
        env["TORCHSTOW_SHM_DIR"] = request.getfixturevalue("shm_dir")
        root = "shm://run"
        os.environ["TORCHSTOW_SHM_DIR"] = env["TORCHSTOW_SHM_DIR"]
    else:
        root, options = request.getfixturevalue("s3_run")
    try:
        first = run_ranks(_ddp_fit, root, options, plugin, env, 3, None, world_size=2, timeout=240)
        assert [r["global_step"] for r in first] == [3, 3]
        assert _names(root, options) == ["epoch=2-step=3.ckpt", "last.ckpt"]
        saved = torchstow.read(f"{root}/checkpoints/last.ckpt", storage_options=options)
        assert saved["state_dict"]["layer.weight"].tolist() == first[0]["weight"] == first[1]["weight"]
        last = "last" if backend != "s3" else last_checkpoint(f"{root}/checkpoints", options)
        again = run_ranks(_ddp_fit, root, options, plugin, env, 5, last, world_size=2, timeout=240)
        assert [(r["steps"], r["global_step"]) for r in again] == [(2, 5), (2, 5)]
        assert _names(root, options) == ["epoch=4-step=5.ckpt", "last.ckpt"]
    finally:
        os.environ.pop("TORCHSTOW_SHM_DIR", None)
