"""A real Lightning Trainer fits, prunes and resumes through the torchstow CheckpointIO plugins."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
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

#: What the DDP ranks import beyond torch and torchstow: the session's forkserver imports it
#: once (tests/conftest.py), rather than each rank (2 s and more each).
FORKSERVER_PRELOAD = ("lightning.pytorch", "torchstow.integrations.lightning")


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


@dataclasses.dataclass
class Schedule:
    """A value only full pickle can store."""

    warmup: int


def _checkpoint(step: int) -> dict[str, Any]:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step, "epoch": 0}


def test_the_checkpoint_resumed_from_stays_until_a_newer_one_commits(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = str(tmp_path / "epoch=0-step=3.ckpt"), str(tmp_path / "epoch=0-step=4.ckpt")
    torchstow.save(_checkpoint(3), old)
    io = TorchstowCheckpointIO()
    assert io.load_checkpoint(old)["global_step"] == 3
    io.remove_checkpoint(old)  # what Lightning does on s3:// before anything newer exists
    assert torchstow.info(old).user_metadata == {}
    assert "resumed from it and no newer checkpoint has been committed" in caplog.text
    io.save_checkpoint(_checkpoint(4), new)
    io.remove_checkpoint(old)
    assert [i.uri for i in torchstow.list_checkpoints(str(tmp_path))] == [new]
    assert torchstow.info(new).step == 4


def test_async_removal_waits_for_the_newer_save_and_is_skipped_if_it_failed(tmp_path: Any) -> None:
    old = str(tmp_path / "old.ckpt")
    torchstow.save(_checkpoint(3), old)
    io = AsyncTorchstowCheckpointIO()
    io.load_checkpoint(old)
    slow = f"faulty+file://{tmp_path}/slow.ckpt?fail=finish&mode=delay&seconds=1"
    io.save_checkpoint(_checkpoint(4), slow)
    io.remove_checkpoint(old)
    assert torchstow.info(old).nbytes > 0  # the newer save has not committed: old stays
    io.teardown()
    assert [i.uri.rsplit("/", 1)[1] for i in torchstow.list_checkpoints(str(tmp_path))] == ["slow.ckpt"]

    io = AsyncTorchstowCheckpointIO()
    io.load_checkpoint(f"{tmp_path}/slow.ckpt")
    io.save_checkpoint(_checkpoint(5), f"faulty+file://{tmp_path}/broken.ckpt?fail=finish&exc=OSError")
    io.remove_checkpoint(f"{tmp_path}/slow.ckpt")
    with pytest.raises(torchstow.CheckpointException, match="OSError"):
        io.teardown()
    assert torchstow.read(f"{tmp_path}/slow.ckpt")["global_step"] == 4  # kept: the newer one failed


@pytest.mark.parametrize("plugin", [TorchstowCheckpointIO, AsyncTorchstowCheckpointIO])
def test_a_checkpoint_saved_again_after_a_preemption_is_removed_like_any_other(
    tmp_path: Any, plugin: Any
) -> None:
    """A run preempted while saving step 4 resumes and saves step 4 again at the same path;
    the killed save's files (written minutes ago, named by no manifest) stay beside the new
    checkpoint. When ModelCheckpoint later removes it, the whole checkpoint goes: the plugin's
    own saves there have ended, so nothing there is a save in flight."""
    step4, step5 = str(tmp_path / "epoch=0-step=4.ckpt"), str(tmp_path / "epoch=0-step=5.ckpt")
    killed = tmp_path / "killed"
    torchstow.save(_checkpoint(4), str(killed))  # the data file the preempted save had written
    os.makedirs(step4)
    for name in os.listdir(killed):
        if name.startswith("data-"):
            os.replace(killed / name, os.path.join(step4, name))
    shutil.rmtree(killed)
    io = plugin()
    io.save_checkpoint(_checkpoint(4), step4)
    io.save_checkpoint(_checkpoint(5), step5)
    io.remove_checkpoint(step4)
    io.teardown()
    assert not os.path.exists(step4)
    assert [i.uri for i in torchstow.list_checkpoints(str(tmp_path))] == [step5]


@pytest.mark.slow
def test_non_tensor_parts_need_no_pickle_and_other_objects_name_their_key(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    _trainer(root, TorchstowCheckpointIO(), 1, save_top_k=1).fit(Tiny())
    uri = f"{root}/checkpoints/epoch=0-step=1.ckpt"
    entries = torchstow.storage_reader(uri).read_metadata().state_dict_metadata
    encodings = {getattr(e, "encoding", "tensor") for e in entries.values()}
    assert encodings <= {"tensor", "json", "torch"}, encodings
    checkpoint = torchstow.read(uri)
    assert checkpoint["pytorch-lightning_version"] and checkpoint["global_step"] == 1
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01

    checkpoint["hyper_parameters"] = {"schedule": Schedule(warmup=3)}
    with pytest.raises(torchstow.PickleNotAllowedError, match=r"hyper_parameters\.schedule.*allow_pickle"):
        TorchstowCheckpointIO().save_checkpoint(checkpoint, f"{root}/objects.ckpt")
    trusting = TorchstowCheckpointIO(allow_pickle=True)
    trusting.save_checkpoint(checkpoint, f"{root}/objects.ckpt")
    assert isinstance(
        trusting.load_checkpoint(f"{root}/objects.ckpt")["hyper_parameters"]["schedule"], Schedule
    )
    with pytest.raises(torchstow.PickleNotAllowedError, match=r"hyper_parameters\.schedule.*allow_pickle"):
        TorchstowCheckpointIO().load_checkpoint(f"{root}/objects.ckpt")
    loaded = TorchstowCheckpointIO().load_checkpoint(f"{root}/objects.ckpt", weights_only=False)
    assert loaded["hyper_parameters"]["schedule"] == Schedule(warmup=3)


@pytest.mark.slow
def test_last_as_a_link_on_local_paths(tmp_path: Any) -> None:
    root = str(tmp_path / "run")
    _trainer(root, TorchstowCheckpointIO(), 3, save_top_k=1, save_last="link").fit(Tiny())
    link = f"{root}/checkpoints/last.ckpt"
    assert os.path.islink(link)
    assert os.readlink(link) == "epoch=1-step=3.ckpt"
    resumed = Tiny()
    trainer = _trainer(root, TorchstowCheckpointIO(), 4, save_top_k=1, save_last="link")
    trainer.fit(resumed, ckpt_path="last")
    assert resumed.steps == 1 and os.readlink(link) == "epoch=1-step=4.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("plugin", [TorchstowCheckpointIO, AsyncTorchstowCheckpointIO])
def test_removing_a_last_link_removes_the_link_not_its_checkpoint(tmp_path: Any, plugin: Any) -> None:
    # With last checkpoints named by step (Lightning's documented CHECKPOINT_NAME_LAST = "{epoch}-last")
    # and save_last="link", Lightning removes the previous last link through the plugin; the
    # removal went through the link and deleted the checkpoint it named, one save_top_k=-1 keeps.
    root = str(tmp_path / "run")
    # (the background plugin's first link failed too: its save had not made the folder yet)
    io = plugin()
    trainer = _trainer(root, io, 3, save_top_k=-1, save_last="link")
    trainer.checkpoint_callback.CHECKPOINT_NAME_LAST = "{step}-last"
    trainer.fit(Tiny())
    io.teardown()
    folder = f"{root}/checkpoints"
    kept = ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=1-step=3.ckpt"]
    assert sorted(os.listdir(folder)) == [*kept, "step=3-last.ckpt"]
    assert os.readlink(f"{folder}/step=3-last.ckpt") == "epoch=1-step=3.ckpt"
    assert _names(root, {}) == [*kept, "step=3-last.ckpt"]  # every one of them committed and whole


def test_a_checkpoint_of_another_run_is_not_removed_off_local_paths(
    s3_run: tuple[str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    # Fine-tuning from another run's checkpoint with a dirpath of its own, ModelCheckpoint
    # reloads that run's best_model_path and, with save_top_k=1, removes it after its first
    # save; Lightning itself refuses a removal outside its dirpath on local paths only.
    root, options = s3_run
    pretrained, best = f"{root}/pretrain/last.ckpt", f"{root}/pretrain/epoch=9-step=90.ckpt"
    torchstow.save(_checkpoint(90), pretrained, storage_options=options)
    torchstow.save(_checkpoint(90), best, storage_options=options)
    io = TorchstowCheckpointIO(options)
    io.load_checkpoint(pretrained)
    io.save_checkpoint(_checkpoint(1), f"{root}/finetune/epoch=0-step=1.ckpt")
    io.remove_checkpoint(best)
    assert torchstow.read(best, storage_options=options)["global_step"] == 90
    assert "outside the folders this run saved checkpoints in" in caplog.text
    io.save_checkpoint(_checkpoint(2), f"{root}/finetune/epoch=0-step=2.ckpt")
    io.remove_checkpoint(f"{root}/finetune/epoch=0-step=1.ckpt")  # its own: removed
    found = torchstow.list_checkpoints(f"{root}/finetune", storage_options=options)
    assert [i.uri.rsplit("/", 1)[1] for i in found] == ["epoch=0-step=2.ckpt"]


def test_resuming_from_a_checkpoint_file_of_lightnings_own_says_so(tmp_path: Any) -> None:
    # A run switched to the plugin, resumed from the last.ckpt Lightning's default
    # CheckpointIO wrote (one torch.save file): a bare NotADirectoryError came out.
    old = tmp_path / "last.ckpt"
    torch.save(_checkpoint(3), old)
    with pytest.raises(torchstow.CheckpointNotFoundError, match="single file, as Lightning's own"):
        TorchstowCheckpointIO().load_checkpoint(old)


def test_a_background_removal_spares_a_checkpoint_saved_again_at_its_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning removes a checkpoint, then saves at the same path again (a metric-named file
    # without version counter); the removal, waiting for the saves asked before it, ran
    # while the new save was writing there and deleted its files: a manifest naming
    # deleted files was committed.
    from torchstow.backends.filesystem import LocalFileStore

    path, other = str(tmp_path / "val_loss=0.50.ckpt"), str(tmp_path / "val_loss=0.40.ckpt")
    torchstow.save(_checkpoint(1), path)
    original, delete = LocalFileStore.publish, torchstow.delete

    def publish(self: LocalFileStore, name: str, data: bytes) -> None:
        if name == "manifest.json":
            time.sleep(1.0)  # each commit waits, its data files written
        original(self, name, data)

    def later(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)  # the new save has written its data files by then
        delete(*args, **kwargs)

    monkeypatch.setattr(LocalFileStore, "publish", publish)
    monkeypatch.setattr(torchstow, "delete", later)
    io = AsyncTorchstowCheckpointIO()
    io.save_checkpoint(_checkpoint(2), other)
    io.remove_checkpoint(path)
    io.save_checkpoint(_checkpoint(3), path)
    io.teardown()
    assert torchstow.read(path)["global_step"] == 3
    assert torchstow.verify(path).ok
