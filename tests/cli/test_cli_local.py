"""The ``torchstow`` verbs on local checkpoints, run in this process through ``main`` (the real
command is started once per verb family in test_cli_smoke.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import torchstow
from torchstow.cli.render import human_duration
from torchstow.format.files import is_data_file
from torchstow.interop.safetensors_format import INDEX

from cli_helpers import Result, assert_one_line_error, fails, invoke, json_doc


def _state(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {
        "model": {
            "layer0": {"weight": torch.randn(32, 16, generator=gen), "bias": torch.randn(32, generator=gen)},
            "head": {"weight": torch.randn(4, 32, generator=gen).to(torch.bfloat16)},
        },
        "optim": {"lr": 0.01, "name": "adamw"},
        "step": step,
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three committed checkpoints, one a save left incomplete, and a directory named ``s3``."""
    for step in (100, 200, 300):
        torchstow.save(_state(step), str(tmp_path / f"step-{step}"), metadata={"loss": step / 1000})
    (tmp_path / "step-400").mkdir()
    (tmp_path / "step-400" / "data-0123456789ab-0-0.bin").write_bytes(b"partial")
    (tmp_path / "s3").mkdir()
    return tmp_path


def _flip_byte(ckpt: Path, at: int) -> str:
    (name,) = [n for n in os.listdir(ckpt) if is_data_file(n)]
    data = bytearray((ckpt / name).read_bytes())
    data[at] ^= 0x01
    (ckpt / name).write_bytes(bytes(data))
    return name


def test_ls_du_info_inspect(run_dir: Path) -> None:
    d = str(run_dir)
    listed = invoke("ls", d)
    assert listed.code == 0, listed.err
    rows = listed.out.splitlines()[1:]
    assert [row.split()[-1] for row in rows] == [f"{d}/step-{s}" for s in (100, 200, 300)]
    assert [row.split()[0] for row in rows] == ["100", "200", "300"]

    every = json_doc("ls", d, "--all")
    assert every["prefix"] == d
    status = {c["uri"]: (c["status"], c["step"]) for c in every["checkpoints"]}
    assert status == {
        f"{d}/step-100": ("committed", 100),
        f"{d}/step-200": ("committed", 200),
        f"{d}/step-300": ("committed", 300),
        f"{d}/step-400": ("incomplete", 400),
    }
    committed = every["checkpoints"][0]
    assert committed["nbytes"] == torchstow.info(f"{d}/step-100").nbytes
    assert committed["user_metadata"] == {"loss": 0.1}

    du = json_doc("du", d)
    sizes = {c["uri"]: c["nbytes"] for c in du["checkpoints"]}
    assert sizes == {f"{d}/step-{s}": torchstow.info(f"{d}/step-{s}").nbytes for s in (100, 200, 300)}
    assert du["total_bytes"] == sum(sizes.values())

    info = json_doc("info", f"{d}/step-200")
    assert (info["format"], info["step"], info["num_entries"]) == ("torchstow", 200, 6)
    assert info["nbytes"] == (32 * 16 + 32) * 4 + 4 * 32 * 2
    assert info["user_metadata"] == {"loss": 0.2}

    keys = json_doc("inspect", f"{d}/step-200", "model.*weight")["keys"]
    assert keys == [
        {
            "key": "model.layer0.weight",
            "kind": "tensor",
            "dtype": "float32",
            "shape": [32, 16],
            "nbytes": 2048,
        },
        {"key": "model.head.weight", "kind": "tensor", "dtype": "bfloat16", "shape": [4, 32], "nbytes": 256},
    ]
    tree = invoke("inspect", f"{d}/step-200")
    assert tree.code == 0, tree.err
    assert "layer0" in tree.out and "weight  float32 [32, 16]  2.0 KiB" in tree.out
    assert "name  str = 'adamw'" in tree.out and "step  int = 200" in tree.out


def test_verify_finds_a_flipped_byte(run_dir: Path) -> None:
    good, bad = run_dir / "step-100", run_dir / "step-200"
    name = _flip_byte(bad, 5)  # inside the first item of the file
    both = invoke("verify", str(good), str(bad), "--json")
    assert both.code == 1
    doc = both.json()
    assert doc["ok"] is False
    first, second = doc["checkpoints"]
    assert first["ok"] is True and first["checked_bytes"] == torchstow.info(str(good)).nbytes
    assert second["ok"] is False
    (problem,) = second["problems"]
    assert problem["file"] == name and problem["offset"] == 0
    assert problem["key"] in {"model.layer0.weight", "model.layer0.bias", "model.head.weight"}
    verified = invoke("verify", str(good), str(bad))
    assert verified.code == 1
    text = verified.out.splitlines()
    assert text[0].startswith(f"OK       {good} ")
    assert text[1].startswith(f"CORRUPT  {bad} ") and name in text[2] and problem["key"] in text[2]


def test_prune_and_rm(run_dir: Path) -> None:
    for step in (500, 1000, 1500):
        torchstow.save(_state(step), str(run_dir / f"step-{step}"))
    d = str(run_dir)
    dry = json_doc("prune", d, "--keep-last", "2", "--keep-every", "200", "--dry-run")
    assert dry["dry_run"] is True
    assert dry["deleted"] == [f"{d}/step-{s}" for s in (100, 300, 500)]
    assert dry["kept"] == [f"{d}/step-{s}" for s in (200, 1000, 1500)]
    assert os.path.isdir(run_dir / "step-100")
    done = invoke("prune", d, "--keep-last", "2", "--keep-every", "200")
    assert done.code == 0, done.err
    assert done.out.splitlines()[-1] == "deleted 3, kept 3"
    assert [i.step for i in torchstow.list_checkpoints(d)] == [200, 1000, 1500]
    assert os.path.isdir(run_dir / "step-400")  # an incomplete save is left alone
    assert invoke("rm", f"{d}/step-200") == Result(0, f"removed {d}/step-200\n", "")
    assert [i.step for i in torchstow.list_checkpoints(d)] == [1000, 1500]


def test_prune_leaves_checkpoints_without_a_step(run_dir: Path) -> None:
    # before: "best" and "final" (no step) were pruned first, as the oldest; a checkpoint
    # whose step is in its user metadata counts as latest() counts it, whatever its name
    d = str(run_dir)
    torchstow.save(_state(250), f"{d}/best")
    torchstow.save(_state(300), f"{d}/final")
    torchstow.save(_state(150), f"{d}/exported", metadata={"step": 150})
    os.symlink("step-300", run_dir / "latest")
    theirs = [f"{d}/final", f"{d}/best", f"{d}/latest"]
    dry = json_doc("prune", d, "--keep-last", "1", "--dry-run")
    assert dry["deleted"] == [f"{d}/step-100", f"{d}/exported", f"{d}/step-200"]
    assert sorted(dry["not_counted"]) == sorted(theirs) and set(theirs) < set(dry["kept"])
    done = invoke("prune", d, "--keep-last", "1")
    assert done.code == 0, done.err
    assert done.out.splitlines()[-1].startswith("deleted 3, kept 4; not counted (no step, or a link)")
    assert sorted(os.listdir(run_dir)) == ["best", "final", "latest", "s3", "step-300", "step-400"]
    assert torchstow.prune(d, keep_last=0) == []  # the API alike: step-300 is the newest step


def test_convert_to_sharded_safetensors_and_back(run_dir: Path, tmp_path: Path) -> None:
    src = str(run_dir / "step-300")
    out = tmp_path / "hf"
    made = invoke(
        "convert",
        src,
        str(out),
        "--to",
        "safetensors",
        "--keys",
        "model.",
        "--max-shard-size",
        "2100B",
        "--json",
    )
    assert made.code == 0, made.err
    report = made.json()
    assert report["source_format"] == "torchstow" and report["skipped"] == []
    shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    doc = json.loads((out / INDEX).read_text())
    original = _state(300)["model"]
    flat = {"layer0.weight": original["layer0"]["weight"], "layer0.bias": original["layer0"]["bias"]}
    flat["head.weight"] = original["head"]["weight"]
    assert doc["metadata"]["total_size"] == sum(t.nbytes for t in flat.values())
    assert doc["weight_map"] == {
        "layer0.weight": shards[0],
        "layer0.bias": shards[1],
        "head.weight": shards[1],
    }
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        loaded.update(load_file(str(out / shard)))
    assert loaded.keys() == flat.keys()
    for key, tensor in flat.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key

    back = tmp_path / "back"
    again = invoke("convert", str(out), str(back), "--to", "torchstow", "--dtype", "float16")
    assert again.code == 0, again.err
    restored = torchstow.read(str(back))
    assert restored.keys() == flat.keys()
    for key, tensor in flat.items():
        assert restored[key].dtype == torch.float16
        assert torch.equal(restored[key], tensor.to(torch.float16)), key


def test_errors_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("ls", str(tmp_path / "nowhere")), "nothing under", "nowhere")
    usage = invoke("prune", str(run_dir))
    assert usage.code == 2 and "--keep-last" in usage.err

    assert "nothing at" in fails("info", str(tmp_path / "nowhere"))
    assert "no checkpoint at" in fails("verify", str(tmp_path / "nowhere"))
    wrong = fails("info", str(run_dir / "step-100"), "-o", "endpoint_url=http://x")
    assert "endpoint_url" in wrong and "thread_count" in wrong
    assert "already exists" in fails("cp", str(run_dir / "step-100"), str(run_dir / "step-200"))
    onto_folder = fails("convert", str(run_dir / "step-100"), str(run_dir / "step-200"), "--to", "torch")
    assert "is a directory" in onto_folder and "nothing was written" in onto_folder
    assert "no key of" in fails(
        "convert", str(run_dir / "step-100"), str(tmp_path / "x"), "--to", "torch", "--keys", "nope"
    )
    remote = fails("convert", str(run_dir / "step-100"), "s3://bucket/hf", "--to", "safetensors")
    assert "local paths only" in remote
    usage = invoke("ls", str(run_dir), "-o", "novalue")
    assert usage.code == 2 and "is not KEY=VALUE" in usage.err
    debug = invoke("info", str(tmp_path / "nowhere"), "--debug")
    assert debug.code == 1 and "Traceback" in debug.err


def test_stock_dcp_checkpoints(tmp_path: Path) -> None:
    stock = tmp_path / "run" / "step-3"
    state = {"w": torch.arange(6.0).reshape(2, 3), "note": "dcp"}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(stock)), no_dist=True)

    ((entry),) = json_doc("ls", str(tmp_path / "run"))["checkpoints"]
    assert (entry["uri"], entry["status"], entry["format"], entry["step"]) == (
        str(stock),
        "committed",
        "dcp",
        3,
    )
    info = json_doc("info", str(stock))
    assert (info["format"], info["step"], info["num_entries"]) == ("dcp", 3, 2)
    assert info["nbytes"] == entry["nbytes"]  # the bytes stored, as ls and du count them
    keys = json_doc("inspect", str(stock))["keys"]
    assert keys[0] == {"key": "w", "kind": "tensor", "dtype": "float32", "shape": [2, 3], "nbytes": 24}
    (report,) = json_doc("verify", str(stock))["checkpoints"]
    assert report["ok"] and report["checked_bytes"] == 24
    out = tmp_path / "hf"
    assert json_doc("convert", str(stock), str(out), "--to", "safetensors")["source_format"] == "dcp"
    assert torch.equal(load_file(str(out / "model-00001-of-00001.safetensors"))["w"], state["w"])


def test_ls_and_info_show_what_each_save_wrote_and_how_long_it_took(tmp_path: Path) -> None:
    d = str(tmp_path)
    full = torchstow.save(_state(100), f"{d}/step-100")
    state = _state(100)
    state["model"]["head"]["weight"] = torch.zeros(4, 32, dtype=torch.bfloat16)  # the only change
    torchstow.save(state, f"{d}/step-200", base=f"{d}/step-100")  # writes the head alone
    dcp.save(_state(300), checkpoint_id=f"{d}/step-300")
    size = (32 * 16 + 32) * 4 + 4 * 32 * 2
    assert full.save_seconds is not None and full.save_seconds > 0

    rows = {c["step"]: c for c in json_doc("ls", d)["checkpoints"]}
    assert rows[100]["nbytes_written"] == size and rows[100]["save_seconds"] == full.save_seconds
    assert rows[200]["nbytes_written"] == 4 * 32 * 2 and rows[200]["save_seconds"] > 0
    assert rows[300]["save_seconds"] is None  # DCP records no duration
    info = json_doc("info", f"{d}/step-200")
    assert (info["nbytes"], info["nbytes_written"]) == (size, 4 * 32 * 2)
    assert info["save_seconds"] == rows[200]["save_seconds"]

    listed = invoke("ls", d)
    assert listed.code == 0, listed.err
    header, *lines = listed.out.splitlines()
    assert header.split() == ["STEP", "COMMITTED", "SIZE", "WRITTEN", "TOOK", "KEYS", "URI"]
    columns = [(line[31:41].strip(), line[43:53].strip(), line[55:63].strip()) for line in lines]
    assert columns[0] == ("2.4 KiB", "2.4 KiB", human_duration(full.save_seconds))
    assert columns[1] == ("2.4 KiB", "256 B", human_duration(rows[200]["save_seconds"]))
    assert columns[2][2] == "-"
    text = invoke("info", f"{d}/step-200").out
    assert f"written:        256 B ({4 * 32 * 2:,} bytes)\n" in text
    assert f"save took:      {human_duration(rows[200]['save_seconds'])}\n" in text
    assert "save took:      -\n" in invoke("info", f"{d}/step-300").out


def test_durations_read_as_a_person_would_say_them() -> None:
    assert [human_duration(s) for s in (None, 0.0042, 2.414, 12.34, 125, 3720)] == [
        "-",
        "4 ms",
        "2.41 s",
        "12.3 s",
        "2m 05s",
        "1h 02m",
    ]


def test_demo_never_replaces_a_checkpoint_of_yours(tmp_path: Path) -> None:
    # `demo --path DIR` writes DIR/step-2: pointed at a run directory, it replaced the
    # run's own step 2 with the demo's model
    torchstow.save(_state(2), str(tmp_path / "step-2"), metadata={"step": 2})
    before = sorted(os.listdir(tmp_path / "step-2"))
    err = fails("demo", "--path", str(tmp_path))
    assert "step-2" in err and "not the demo's" in err
    assert sorted(os.listdir(tmp_path / "step-2")) == before
    back = torchstow.read(str(tmp_path / "step-2"))
    assert torch.equal(back["model"]["layer0"]["weight"], _state(2)["model"]["layer0"]["weight"])


def test_du_counts_a_linked_checkpoint_once(run_dir: Path) -> None:
    # latest -> step-300 holds step-300's bytes: before, du's total counted them twice
    os.symlink("step-300", run_dir / "latest")
    sizes = {f"step-{s}": torchstow.info(str(run_dir / f"step-{s}")).nbytes for s in (100, 200, 300)}
    du = json_doc("du", str(run_dir))
    assert du["total_bytes"] == sum(sizes.values())
    links = {os.path.basename(row["uri"]): row["link"] for row in du["checkpoints"]}
    assert links == {"latest": True, "step-100": False, "step-200": False, "step-300": False}
    text = invoke("du", str(run_dir)).out
    assert "latest  (a symbolic link: not in the total)" in text and "(3 checkpoints," in text
    assert json_doc("du", str(run_dir / "latest"))["total_bytes"] == sizes["step-300"]  # asked for itself


def test_verify_of_several_goes_on_past_one_that_is_not_there(run_dir: Path) -> None:
    # before: the first URI with nothing there stopped the command; the ones after it were
    # never verified, and --json printed nothing at all
    good, typo, bad = run_dir / "step-100", run_dir / "step-1OO", run_dir / "step-200"
    _flip_byte(bad, 5)
    verified = invoke("verify", str(good), str(typo), str(bad))
    assert verified.code == 1
    assert [line.split()[0] for line in verified.out.splitlines()[:2]] == ["OK", "CORRUPT"]
    assert_one_line_error(verified, f"no checkpoint at {typo}")
    doc = invoke("verify", "--json", str(good), str(typo), str(bad)).json()
    assert doc["ok"] is False and doc["missing"] == [str(typo)]
    assert [c["ok"] for c in doc["checkpoints"]] == [True, False]
    assert invoke("verify", "--json", str(good)).json()["missing"] == []


def test_verify_of_several_goes_on_past_any_that_cannot_be_verified(run_dir: Path) -> None:
    """A manifest of a newer format (or permission denied, a storage error) among several:
    before, verify stopped there, the URIs after it never verified nor reported."""
    newer, typo, good = run_dir / "step-100", run_dir / "step-1OO", run_dir / "step-200"
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    verified = invoke("verify", str(newer), str(good), str(typo))
    assert verified.code == 1 and verified.out.split()[:2] == ["OK", str(good)], verified
    assert_one_line_error(verified, f"{newer}/manifest.json has format version 99")
    assert f"; no checkpoint at {typo}" in verified.err
    doc = invoke("verify", "--json", str(newer), str(good)).json()
    assert doc["ok"] is False and [c["uri"] for c in doc["checkpoints"]] == [str(good)]
    assert doc["missing"] == [] and [e["uri"] for e in doc["errors"]] == [str(newer)]
    assert "format version 99" in doc["errors"][0]["error"]


def test_a_file_where_a_prefix_or_checkpoint_goes_is_named(run_dir: Path) -> None:
    """ls/du of a file, and info/inspect/verify of a checkpoint's manifest.json, say what the
    file is (before: "it does not exist or is empty", a torch.load traceback's words, and
    verify reported the checkpoint CORRUPT)."""
    notes = run_dir / "notes.txt"
    notes.write_text("mine")
    assert f"nothing under {notes}: {notes} is a file, not a directory" in fails("ls", str(notes))
    assert f"{notes} is a file" in fails("du", str(notes / "sub"))
    manifest = str(run_dir / "step-100" / "manifest.json")
    folder = str(run_dir / "step-100")
    assert f"is the manifest.json of the checkpoint {folder}: give the folder" in fails("ls", manifest)
    for where in (manifest, str(notes), str(notes / "sub")):  # before: "no checkpoint at" alone
        assert "nothing was deleted" in fails("rm", where, "--force")
    assert f"{manifest} is the manifest.json of the checkpoint {folder}" in fails("rm", manifest)
    assert f"no checkpoint at {notes}: {notes} is a file" in fails("rm", str(notes))
    assert notes.read_text() == "mine" and os.path.exists(manifest)
    for verb in ("info", "inspect", "verify"):
        assert f"{manifest} is the manifest.json of the checkpoint {folder}: give the folder" in fails(
            verb, manifest
        )
    (data,) = [name for name in os.listdir(folder) if is_data_file(name)]
    for verb in ("info", "verify"):  # before: "not a torch.save file", and verify said CORRUPT
        assert f"{data} is a file of the checkpoint {folder}: give the folder" in fails(
            verb, f"{folder}/{data}"
        )
    both = invoke("verify", manifest, folder, "--json")  # one missing among several: named, not corrupt
    assert both.code == 1 and both.json()["missing"] == [manifest], both
    assert [c["uri"] for c in both.json()["checkpoints"]] == [folder]


def test_a_run_given_for_one_checkpoint_says_so(run_dir: Path) -> None:
    for verb in ("verify", "info", "inspect", "rm"):
        error = fails(verb, str(run_dir))
        assert f"no checkpoint at {run_dir}: {run_dir} holds 5 locations (" in error, error
        assert f"give one checkpoint ('torchstow ls {run_dir}' lists them)" in error
    assert "holds" not in fails("verify", str(run_dir / "nope"))  # nothing there: as before


def test_ls_tiers_of_nothing_is_an_error(tmp_path: Path) -> None:
    """A missing root is an error, as for ls without --tiers (before: exit 0, an empty list)."""
    missing = str(tmp_path / "nope")
    assert f"nothing under {missing}: it does not exist or is empty" in fails("ls", missing, "--tiers")
    error = fails("ls", missing, "--tiers", "--json", "--fast", str(tmp_path / "fast" / "{node}"))
    assert "and no step is in" in error
    torchstow.save({"w": torch.ones(2)}, str(tmp_path / "run" / "best"))  # something, but no step
    empty = invoke("ls", str(tmp_path / "run"), "--tiers", "--json")
    assert empty.code == 0 and empty.json()["steps"] == [], empty


def test_cp_compressed_to_a_file_is_refused_before_anything_is_read(run_dir: Path) -> None:
    """Before: the conversion's save failed with a raw [Errno 17] inside a planning failure."""
    notes = run_dir / "notes.txt"
    notes.write_text("mine")
    src = str(run_dir / "step-100")
    for dst in (notes, notes / "sub"):
        error = fails("cp", src, str(dst), "--compression", "zstd", "--overwrite")
        assert f"cannot copy to {dst}: it is a file, or lies under one" in error
        with pytest.raises(ValueError, match="it is a file, or lies under one"):
            torchstow.copy(src, str(dst), compression="zstd")
    assert notes.read_text() == "mine"


def test_prune_lists_the_prefix_once(run_dir: Path) -> None:
    """What prune reports and what it deletes come from one listing (before: the command
    listed the prefix, and read every manifest, once for its report and again to prune)."""
    from torchstow.plugins.resolve import backend_at

    backend_class = type(backend_at(str(run_dir))[1])
    real = backend_class.list_children
    with mock.patch.object(backend_class, "list_children", autospec=True, side_effect=real) as listed:
        doc = json_doc("prune", str(run_dir), "--keep-last", "1")
    assert [c.args[1] for c in listed.call_args_list] == [str(run_dir)]
    assert doc["deleted"] == [f"{run_dir}/step-{s}" for s in (100, 200)]
    assert doc["kept"] == [f"{run_dir}/step-300"]


def test_prune_racing_another_prune_is_no_error(run_dir: Path) -> None:
    """A manager's retention (or a second prune) deletes step-200 while this prune runs: it is
    gone as planned (before: the prune stopped there, CheckpointNotFoundError, exit 1)."""
    (run_dir / "step-400" / "data-0123456789ab-0-0.bin").unlink()
    torchstow.save(_state(500), str(run_dir / "step-500"))

    def other_prune(done: int, total: int) -> None:
        if (run_dir / "step-200").exists():
            torchstow.delete(str(run_dir / "step-200"))

    deleted = torchstow.prune(str(run_dir), keep_last=1, progress=other_prune)
    assert deleted == [str(run_dir / f"step-{s}") for s in (100, 200, 300)]
    assert sorted(os.listdir(run_dir)) == ["s3", "step-400", "step-500"]


def test_prune_through_a_wrapper_never_deletes_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """latest -> step-3 under a run read through a byte-transforming wrapper (xor+, as an
    encrypting one): before, the link was not seen there, so prune counted it as one more
    step 3 and deleted one of the two, the newest step's files either way."""
    from xor_wrapper import XorBackend, install

    install(monkeypatch, XorBackend)
    for step in (1, 2, 3):
        torchstow.save(
            {"w": torch.full((4,), float(step))}, str(tmp_path / f"step-{step}"), metadata={"step": step}
        )
    (tmp_path / "latest").symlink_to("step-3")
    doc = json_doc("prune", f"xor+file://{tmp_path}", "--keep-last", "1", "-o", "xor.key=7")
    assert doc["deleted"] == [f"xor+file://{tmp_path}/step-{s}" for s in (1, 2)]
    assert doc["not_counted"] == [f"xor+file://{tmp_path}/latest"]
    assert torch.equal(torchstow.read(str(tmp_path / "latest"))["w"], torch.full((4,), 3.0))
