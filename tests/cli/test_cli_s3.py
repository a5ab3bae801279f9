"""The ``torchstow`` command between shared memory and S3 (a moto server), with ``-o`` storage options."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import torchstow
from moto_s3 import s3_client
from torchstow.cli import main
from torchstow.format.files import is_data_file
from torchstow.testing import assert_same_state

from cli_helpers import COMMAND, S3_KEYS, assert_one_line_error, fails, invoke, json_doc
from s3_faults import FaultProxy, Link, MiB
from waits import wait_until

NO_AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _data_files(shm_dir: str, name: str) -> list[bytes]:
    folder = os.path.join(shm_dir, name)
    return sorted(open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder) if is_data_file(f))


def test_cp_shm_to_s3_and_back_bit_exact(cli_s3: str, shm_dir: str) -> None:
    gen = torch.Generator().manual_seed(3)
    state = {
        "w": torch.randn(300, 1000, generator=gen),  # over 1 MiB: its own 4 KiB-aligned span
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "nan": torch.tensor([float("nan"), -0.0]),
        "meta": {"epoch": 3, "note": "cp test"},
    }
    torchstow.save(state, "shm://run/step-5", storage_options={"shm_dir": shm_dir}, metadata={"step": 5})
    env = {"TORCHSTOW_SHM_DIR": shm_dir}
    s3 = [
        "-o",
        f"endpoint_url={cli_s3}",
        "-o",
        f"key={S3_KEYS['key']}",
        "-o",
        f"secret={S3_KEYS['secret']}",
    ]

    up = invoke("cp", "shm://run/step-5", "s3://cli-tests/run/step-5", *s3, env=env)
    assert up.code == 0, up.err
    assert up.out.startswith("copied shm://run/step-5 -> s3://cli-tests/run/step-5")
    listed = json_doc("ls", "s3://cli-tests/run", *s3)
    ((entry),) = listed["checkpoints"]
    assert (entry["uri"], entry["status"], entry["step"]) == ("s3://cli-tests/run/step-5", "committed", 5)
    assert entry["nbytes"] == torchstow.info("shm://run/step-5", storage_options={"shm_dir": shm_dir}).nbytes

    down = invoke("cp", "s3://cli-tests/run/step-5", "shm://back/step-5", *s3, "--json", env=env)
    assert down.code == 0, down.err
    assert down.json()["dst"] == "shm://back/step-5"
    assert _data_files(shm_dir, "back/step-5") == _data_files(shm_dir, "run/step-5")
    assert_same_state(torchstow.read("shm://back/step-5", storage_options={"shm_dir": shm_dir}), state)

    nobody = invoke(
        "info",
        "s3://cli-tests/run/step-5",
        "-o",
        f"endpoint_url={cli_s3}",
        "-o",
        "retry_attempts=1",
        unset=NO_AWS_CREDENTIALS,
        env={
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    assert_one_line_error(nobody, "credentials")


def _interrupted(args: list[str], env: dict[str, str], started: Callable[[], bool]) -> float:
    """Runs ``torchstow ARGS...``, sends it SIGINT once ``started()`` and returns how many
    seconds it took to exit then; it must exit 130 saying it was interrupted."""
    proc = subprocess.Popen(
        [COMMAND, *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def under_way() -> bool:
        assert proc.poll() is None, proc.communicate()  # it must not have ended already
        return started()

    try:
        wait_until(under_way, 120, "the copy to start")
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        stop_s = time.monotonic() - interrupted
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode().strip() == "torchstow: interrupted", (out, err)
    return stop_s


@pytest.fixture
def slow_link(cli_s3: str) -> Iterator[FaultProxy]:
    """A link of 12 MiB/s each way in front of the moto server (a proxy in this process)."""
    link = FaultProxy(cli_s3, link=Link(total=12 * MiB))
    try:
        yield link
    finally:
        link.close()


@pytest.mark.slow  # real processes (a signal needs one)
def test_ctrl_c_stops_a_copy_to_and_from_s3_promptly_and_leaves_nothing(
    cli_s3: str, slow_link: FaultProxy, tmp_path: Path
) -> None:
    src = str(tmp_path / "step-1")
    gen = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(12, 1 << 20, generator=gen) for i in range(4)}  # 4 files of 48 MiB
    torchstow.save(state, src, storage_options={"thread_count": 4})
    client = s3_client(cli_s3)
    s3 = {"endpoint_url": cli_s3, **S3_KEYS}
    torchstow.copy(src, "s3://cli-tests/sigint/whole", dst_storage_options=s3)  # what the copy down reads
    # The copies go through the slow link: however fast or busy the machine, no copy of these
    # 192 MiB ends within 16 s, so one seen under way is still under way when the signal lands,
    # and one that ends within half that time stopped rather than ran to its end.
    assert slow_link.link.total is not None
    fastest_s = torchstow.info(src).nbytes / slow_link.link.total
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEYS["key"], "AWS_SECRET_ACCESS_KEY": S3_KEYS["secret"]}
    env["AWS_ENDPOINT_URL"] = slow_link.url

    # Up: small parts, one in flight per file, so the uploads start early.
    up = ["--dst-option", "part_size=5242880", "--dst-option", "multipart_threshold=5242880"]
    up += ["--dst-option", "concurrency=1", "--no-progress"]

    def uploading() -> bool:
        return bool(client.list_multipart_uploads(Bucket="cli-tests", Prefix="sigint/cut/").get("Uploads"))

    stop_s = _interrupted(["cp", src, "s3://cli-tests/sigint/cut", *up], env, uploading)
    assert stop_s < fastest_s / 2, (stop_s, fastest_s)  # it stopped, rather than running to the end
    assert "Contents" not in client.list_objects_v2(Bucket="cli-tests", Prefix="sigint/cut/")
    assert not uploading()

    # Down: 4 MiB segments (ranged reads of 4 MiB, one at a time), into a local directory.
    down = ["--src-option", "range_size=4194304", "--src-option", "concurrency=1", "--no-progress"]
    cut = tmp_path / "cut"

    def downloading() -> bool:
        return cut.is_dir() and any(f.stat().st_size for f in cut.iterdir())

    stop_s = _interrupted(["cp", "s3://cli-tests/sigint/whole", str(cut), *down], env, downloading)
    assert stop_s < fastest_s / 2, (stop_s, fastest_s)
    assert not cut.exists() or list(cut.iterdir()) == []
    torchstow.delete("s3://cli-tests/sigint/whole", storage_options=s3)  # the session's server keeps it else


def test_s3_settings_from_the_environment_and_clear_errors(
    cli_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(tmp_path / "step-7")
    torchstow.save({"w": torch.arange(5.0)}, src)
    for name in NO_AWS_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", cli_s3)  # what docs/backends.md lists: no -o needed
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEYS["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEYS["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert main(["cp", src, "s3://cli-tests/env/step-7"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"copied {src} -> s3://cli-tests/env/step-7 ")
    assert main(["info", "S3://cli-tests/env/step-7", "--json"]) == 0  # schemes are case-insensitive
    assert json.loads(capsys.readouterr().out)["uri"] == "s3://cli-tests/env/step-7"
    assert torch.equal(torchstow.read("s3://cli-tests/env/step-7")["w"], torch.arange(5.0))

    assert "'s3://' names no bucket" in fails("ls", "s3://")
    assert "'s3:///x' names no bucket" in fails("ls", "s3:///x")  # before: the bucket '' does not exist
    assert "the bucket 'no-such-bucket' does not exist" in fails("ls", "s3://no-such-bucket/run")
    assert "the bucket 'no-such-bucket' does not exist" in fails("ls", "s3://no-such-bucket/run", "--tiers")
    # gc of nothing at all is an error naming it (before: exit 0 for a prefix, and for a
    # missing bucket S3's own words)
    assert "the bucket 'no-such-bucket' does not exist" in fails("gc", "s3://no-such-bucket/run")
    assert "nothing under s3://cli-tests/nothing-here" in fails("gc", "s3://cli-tests/nothing-here")
    assert torchstow.latest("s3://no-such-bucket/run") is None  # a first run: its first save makes the bucket
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = fails(
        "ls", "s3://cli-tests/env", "-o", f"endpoint_url=http://127.0.0.1:{port}", "-o", "retry_attempts=1"
    )
    assert "check the endpoint" in refused and "retry_attempts" not in refused
