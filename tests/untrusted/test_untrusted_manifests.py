"""A checkpoint from someone else: every way its manifest can lie ends in a documented error
naming the checkpoint, the key and the file - never a read outside the checkpoint, a hang,
an allocation on the manifest's word, another exception type, or wrong values."""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from tamper import (
    as_row_chunks,
    crc,
    original,
    read_manifest,
    save_original,
    tamper,
    write_bytes,
    write_manifest,
    zeros_like_original,
)

import torchstow

Doc = dict[str, Any]


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    return save_original(str(tmp_path / "ckpt"))


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Fail a test that blocks (a FIFO opened for reading waits for a writer forever)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError("the operation hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def every_reader(path: str) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("info", lambda: torchstow.info(path)),
        ("read", lambda: torchstow.read(path)),
        ("load", lambda: torchstow.load(zeros_like_original(), path)),
    ]


def assert_refused(path: str, *patterns: str, readers: tuple[str, ...] = ("info", "read", "load")) -> None:
    """Each reader raises CorruptCheckpointError whose message names the checkpoint and ``patterns``."""
    for name, call in every_reader(path):
        if name not in readers:
            continue
        with pytest.raises(torchstow.CorruptCheckpointError) as info:
            call()
        message = str(info.value)
        assert path in message, f"{name}: {message}"
        for pattern in patterns:
            assert re.search(pattern, message), f"{name}: {pattern!r} not in {message!r}"


def test_the_untampered_checkpoint_reads_back(ckpt: str) -> None:
    got = torchstow.read(ckpt)
    assert torch.equal(got["w"], original()["w"])
    assert got["opt"]["betas"] == (0.9, 0.99)


# 1. Paths that escape the checkpoint


@pytest.mark.parametrize(
    "name", ["../../secret.bin", "/etc/passwd", "sub/data-x.bin", "..", "", "manifest.json"]
)
def test_file_names_must_be_plain_data_files_inside_the_checkpoint(
    ckpt: str, tmp_path: Any, name: str
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)))
    tamper(ckpt, lambda doc: doc["files"].__setitem__(0, name))
    assert_refused(ckpt, r"manifest\.json", r"files\[0\]", "plain data-file name")


def test_etc_passwd_with_a_matching_checksum_is_never_read(ckpt: str) -> None:
    with open("/etc/passwd", "rb") as f:
        secret = f.read(48)
    if len(secret) < 48:
        pytest.skip("/etc/passwd is shorter than one 4 x 3 float32 tensor")

    def point_at_passwd(doc: Doc) -> None:
        doc["files"].append("/etc/passwd")
        doc["entries"]["w"].update(file=len(doc["files"]) - 1, offset=0, crc32c=[crc(secret)])

    tamper(ckpt, point_at_passwd)
    assert_refused(ckpt, r"manifest\.json", r"files\[\d\]")


def _point_w_at_a_link_outside(ckpt: str, tmp_path: Any) -> None:
    """Make ``w``'s data file a symbolic link to a file outside the checkpoint, with ``w``'s bytes."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(original()["w"].numpy().tobytes())
    os.symlink(outside, os.path.join(ckpt, "data-link.bin"))

    def point_at_link(doc: Doc) -> None:
        doc["files"].append("data-link.bin")
        doc["entries"]["w"].update(file=len(doc["files"]) - 1, offset=0)

    tamper(ckpt, point_at_link)


def test_a_symbolic_link_in_the_checkpoint_is_not_followed(ckpt: str, tmp_path: Any) -> None:
    _point_w_at_a_link_outside(ckpt, tmp_path)
    assert_refused(ckpt, "data-link.bin", "'w'", readers=("read", "load"))


def test_a_mapped_read_does_not_follow_a_symbolic_link(ckpt: str, tmp_path: Any) -> None:
    _point_w_at_a_link_outside(ckpt, tmp_path)
    with pytest.raises(torchstow.CorruptCheckpointError, match=r"data-link\.bin"):
        torchstow.read(ckpt, mmap=True)


def test_a_fifo_named_as_a_data_file_does_not_hang(ckpt: str) -> None:
    os.mkfifo(os.path.join(ckpt, "data-fifo.bin"))

    def point_at_fifo(doc: Doc) -> None:
        doc["files"].append("data-fifo.bin")
        doc["entries"]["w"].update(file=len(doc["files"]) - 1, offset=0)

    tamper(ckpt, point_at_fifo)
    assert_refused(ckpt, "data-fifo.bin", "'w'", readers=("read", "load"))


# 2. Inconsistent manifests that used to give silently wrong data


def test_chunks_that_tile_the_tensor_read_back_exactly(ckpt: str) -> None:
    tamper(ckpt, lambda doc: as_row_chunks(ckpt, doc, [(0, 1), (1, 3), (3, 4)]))
    assert torch.equal(torchstow.read(ckpt)["w"], original()["w"])


def test_a_zero_length_location_for_a_tensor_with_elements(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc["entries"]["w"].update(length=0, crc32c=[]))
    assert_refused(ckpt, "'w'", "length is 0 bytes, but its elements take 48")


def test_chunks_that_leave_a_gap(ckpt: str) -> None:
    tamper(ckpt, lambda doc: as_row_chunks(ckpt, doc, [(0, 2), (3, 4)]))
    assert_refused(ckpt, "'w'", "cover 9 elements of the 12")


def test_chunks_that_overlap(ckpt: str) -> None:
    # Rows 0-1 and 1-2 and 3: the right number of elements, row 1 twice and row 2 never... by volume
    # 6 + 3 + 3 = 12, so only the overlap test can find it.
    tamper(ckpt, lambda doc: as_row_chunks(ckpt, doc, [(0, 2), (1, 2), (3, 4)]))
    assert_refused(ckpt, "'w'", "overlap")


def test_a_chunk_beyond_the_shape(ckpt: str) -> None:
    tamper(ckpt, lambda doc: as_row_chunks(ckpt, doc, [(0, 2), (2, 5)]))
    assert_refused(ckpt, "'w'", "beyond the shape")


def test_two_keys_recorded_at_one_place(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc["planner_data"]["paths"].update({"opt.step": ["w"]}))
    assert_refused(ckpt, "'w'", "'opt.step'", "same place")


def test_a_key_recorded_inside_another_key(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc["planner_data"]["paths"].update({"opt.step": ["w", "x"]}))
    assert_refused(ckpt, "'opt.step'", "inside key 'w'")


@pytest.mark.parametrize(
    ("renamed", "pattern"), [("w.lr", "inside key 'w'"), ("opt", "where a container is")]
)
def test_plain_dotted_keys_that_collide(tmp_path: Any, renamed: str, pattern: str) -> None:
    # Only dicts and ordinary keys: the structure is checked on the dotted names themselves.
    path = str(tmp_path / "ckpt")
    torchstow.save({"w": torch.ones(2), "opt": {"lr": torch.zeros(1)}}, path, format_version=1)
    tamper(path, lambda doc: doc["entries"].update({renamed: doc["entries"].pop("opt.lr")}))
    for _, call in every_reader(path)[:2]:
        with pytest.raises(torchstow.CorruptCheckpointError, match=pattern):
            call()


# 3. Allocation on the manifest's word


def test_a_shape_of_ten_to_the_twelve_elements(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc["entries"]["w"].update(shape=[10**6, 10**6]))
    assert_refused(ckpt, "'w'", "length is 48 bytes")


def test_a_negative_dimension(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc["entries"]["w"].update(shape=[-4, -3]))
    assert_refused(ckpt, "'w'", r"shape'\[0\] is -4")


def test_a_consistent_claim_larger_than_the_file_is_refused_before_allocating(ckpt: str) -> None:
    # 10**11 bytes claimed with the right number of checksums: only the file size can refute it.
    nbytes = 10**11

    def claim(doc: Doc) -> None:
        entry = doc["entries"]["opt.betas"]
        entry.update(length=nbytes, crc32c=[0] * -(-nbytes // doc["checksum"]["block_size"]))

    tamper(ckpt, claim)
    assert_refused(ckpt, "'opt.betas'", "data-.*bin is \\d+ bytes", readers=("read", "load"))


def test_a_two_gib_object_claim_in_a_one_kib_file(ckpt: str) -> None:
    nbytes = 2 << 30

    def claim(doc: Doc) -> None:
        entry = doc["entries"]["opt.betas"]
        entry.update(offset=0, length=nbytes, crc32c=[0] * (nbytes // doc["checksum"]["block_size"]))

    tamper(ckpt, claim)
    assert_refused(ckpt, "'opt.betas'", "truncated or the manifest is wrong", readers=("read", "load"))


# 4. What used to escape as internal exceptions


def manifest_text(ckpt: str) -> str:
    with open(os.path.join(ckpt, "manifest.json")) as f:
        return f.read()


def test_json_nested_a_hundred_thousand_deep(ckpt: str) -> None:
    text = manifest_text(ckpt)
    deep = "[" * 100_000 + "]" * 100_000
    write_bytes(ckpt, text.replace('"user_metadata":{}', f'"user_metadata":{{"x":{deep}}}').encode())
    assert "[[[[" in manifest_text(ckpt)
    assert_refused(ckpt, r"manifest\.json", "JSON")


def test_json_nested_deeper_than_the_limit_but_parseable(ckpt: str) -> None:
    tamper(ckpt, lambda doc: doc.update(user_metadata={"x": [[[[[[[[[[]]]]]]]]]] * 1}))
    assert torchstow.info(ckpt).user_metadata == {"x": [[[[[[[[[[]]]]]]]]]]}
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    tamper(ckpt, lambda doc: doc.update(user_metadata={"x": deep}))
    assert_refused(ckpt, r"manifest\.json", "nests deeper than")


def test_keys_nest_at_most_a_hundred_deep_on_save_as_on_read(tmp_path: Any) -> None:
    """A key's path has at most 100 parts: a save refuses deeper before writing anything,
    so torchstow never writes what its reader refuses."""

    def nested(parts: int) -> dict[str, Any]:
        state: Any = torch.ones(1)
        for _ in range(parts):
            state = {"m": state}
        return state  # type: ignore[no-any-return]

    torchstow.save(nested(100), tmp_path / "at")
    node: Any = torchstow.read(tmp_path / "at")
    for _ in range(100):
        node = node["m"]
    assert torch.equal(node, torch.ones(1))
    with pytest.raises(torchstow.CheckpointException, match="nests deeper than 100 levels"):
        torchstow.save(nested(101), tmp_path / "past")
    assert not (tmp_path / "past").exists() or not list((tmp_path / "past").iterdir())


def test_a_five_thousand_digit_integer(ckpt: str) -> None:
    text = manifest_text(ckpt)
    write_bytes(ckpt, re.sub(r'"offset":\d+', '"offset":' + "9" * 5000, text, count=1).encode())
    assert_refused(ckpt, r"manifest\.json")


@pytest.mark.parametrize(
    ("change", "patterns"),
    [
        (lambda doc: doc.update(entries=list(doc["entries"])), [r"got `array` - at `\$\.entries`"]),
        (lambda doc: doc["entries"].update(w=7), ["entries\\['w'\\]", "got `int`"]),
        (lambda doc: doc["entries"]["w"].update(crc32c=[]), ["entries\\['w'\\]", "crc32c has 0 checksums"]),
        (lambda doc: doc["entries"]["w"].update(offset=-64), ["entries\\['w'\\]", "offset is -64"]),
        (
            lambda doc: doc["entries"]["w"].update(offset="0"),
            ["entries\\['w'\\]", r"got `str` - at `\$\.offset`"],
        ),
        (lambda doc: doc["entries"]["w"].update(file=9), ["entries\\['w'\\]", "file is 9"]),
        (lambda doc: doc["entries"]["w"].update(dtype="Tensor"), ["entries\\['w'\\]", "dtype 'Tensor'"]),
        (lambda doc: doc["entries"]["w"].update(shape=None), ["entries\\['w'\\]", "without a 'shape'"]),
        (lambda doc: doc["entries"]["w"].update(crc32c=[2**40]), ["entries\\['w'\\]", r"crc32c\[0\]"]),
        (
            lambda doc: doc["entries"]["opt.betas"].update(encoding="marshal"),
            ["'opt.betas'", "encoding 'marshal'"],
        ),
        (lambda doc: doc.update(planner_data="flat"), ["planner_data", "is str"]),
        (
            lambda doc: doc["planner_data"].update(containers=5),
            ["planner_data", "'containers' must be a list"],
        ),
        (lambda doc: doc["planner_data"]["containers"].append([["x"], "set", 0]), ["containers"]),
        (lambda doc: doc["planner_data"]["paths"].update({"w": "w"}), ["paths\\['w'\\]"]),
        # keys nested past Python's recursion limit: reading them was a RecursionError
        (
            lambda doc: doc["planner_data"]["paths"].update(w=["m"] * 5000 + ["w"]),
            ["paths\\['w'\\] has 5001 parts, not 1 to 100"],
        ),
        (
            lambda doc: doc["planner_data"]["containers"].append([["m"] * 5000, "dict", 0]),
            ["containers\\[3\\] nests 5000 deep, more than 99"],
        ),
        (
            lambda doc: doc.update(
                planner_data=None, entries={".".join("m" * 5000): doc["entries"].pop("w"), **doc["entries"]}
            ),
            ["has more than 100 dotted parts"],
        ),
        (lambda doc: doc.update(user_metadata=[1]), [r"got `array` - at `\$\.user_metadata`"]),
        (lambda doc: doc.update(committed_at="yesterday"), [r"got `str` - at `\$\.committed_at`"]),
        # epoch seconds no datetime can show: `ls` of its prefix used to end in OverflowError
        (lambda doc: doc.update(committed_at=1e300), [r"<= 253402128000\.0 - at `\$\.committed_at`"]),
        (lambda doc: doc.update(committed_at=-1e18), [r">= 0\.0 - at `\$\.committed_at`"]),
        (lambda doc: doc.update(checksum={"block_size": -1}), ["block_size is -1"]),
    ],
)
def test_wrong_types_and_ranges(ckpt: str, change: Callable[[Doc], Any], patterns: list[str]) -> None:
    tamper(ckpt, change)
    assert_refused(ckpt, r"manifest\.json", *patterns)


@pytest.mark.parametrize("version", [0, -1, True, "1", None])
def test_a_version_that_is_no_format_version(ckpt: str, version: Any) -> None:
    tamper(ckpt, lambda doc: doc.update(version=version))
    for _, call in every_reader(ckpt):
        with pytest.raises(torchstow.FormatVersionError, match=re.escape(f"{version!r}")):
            call()


def test_a_manifest_that_is_not_an_object(ckpt: str) -> None:
    write_manifest(ckpt, [1, 2, 3])
    assert_refused(ckpt, r"manifest\.json", "not a torchstow manifest")


def test_a_payload_matching_its_checksum_that_is_no_torch_object(ckpt: str) -> None:
    doc = read_manifest(ckpt)
    w, betas = doc["entries"]["w"], doc["entries"]["opt.betas"]
    betas.update(file=w["file"], offset=w["offset"], length=w["length"], crc32c=w["crc32c"])
    write_manifest(ckpt, doc)
    assert_refused(ckpt, "'?opt.betas'?", "do not decode", readers=("read", "load"))


# The commit's siblings


def test_latest_and_list_skip_and_log_siblings_they_cannot_read(tmp_path: Any, caplog: Any) -> None:
    root = str(tmp_path)
    good = save_original(os.path.join(root, "step-1"))
    names = ("step-2", "step-3", "step-4", "step-5", "step-6")
    bad = {name: save_original(os.path.join(root, name)) for name in names}
    os.remove(os.path.join(bad["step-2"], "manifest.json"))
    os.mkdir(os.path.join(bad["step-2"], "manifest.json"))  # a directory where the manifest should be
    os.remove(os.path.join(bad["step-3"], "manifest.json"))
    os.mkfifo(os.path.join(bad["step-3"], "manifest.json"))  # would block a plain open()
    write_bytes(bad["step-4"], b'{"format":"torchstow","version":1,"entries":' + b"[" * 100_000)
    os.remove(os.path.join(bad["step-5"], "manifest.json"))
    os.symlink(os.path.join(good, "manifest.json"), os.path.join(bad["step-5"], "manifest.json"))
    tamper(bad["step-6"], lambda doc: doc.update(committed_at=1e300))  # after the year 9999
    with caplog.at_level(logging.WARNING, logger="torchstow"):
        assert torchstow.latest(root) == good
        assert [c.uri for c in torchstow.list_checkpoints(root)] == [good]
    for name in bad:
        assert any(
            name in record.getMessage() and "skipping" in record.getMessage() for record in caplog.records
        )
