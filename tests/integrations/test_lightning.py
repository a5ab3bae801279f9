"""A real Lightning Trainer fits, prunes and resumes through the torchstow CheckpointIO plugins."""

from __future__ import annotations

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
