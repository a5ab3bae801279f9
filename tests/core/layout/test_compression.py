"""save(..., compression="zstd"): every item compressed on its own (floating-point bytes grouped
by significance first), read back bit-exact by every reader; checksums over the stored bytes; a
damaged or lying compressed item is a clear error naming its key."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import zstandard

import torchstow
from manifest_json import manifest_doc
from torchstow.core.layout.compression import compress, decompress_into
from torchstow.core.layout.views import tensor_bytes
from torchstow.errors import ChecksumMismatchError, CorruptCheckpointError
from torchstow.format.compression import BYTEPLANES, ZSTD
from torchstow.testing.compare import assert_same_state


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values like trained weights: small normals (their exponent bytes repeat)."""
    if dtype.is_complex:
        return (torch.randn(shape, generator=_gen(seed), dtype=dtype) * 0.02).to(dtype)
    return (torch.randn(shape, generator=_gen(seed)) * 0.02).to(dtype)


def _state(seed: int = 0) -> dict[str, Any]:
    special = _weights((64, 64), torch.float32, seed)
    special[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")])
    return {
        "fp32": special,
        "bf16": _weights((128, 64), torch.bfloat16, seed + 1),
        "fp16": _weights((128, 64), torch.float16, seed + 2),
        "fp64": _weights((32, 64), torch.float64, seed + 3),
        "cplx": torch.complex(
            _weights((32, 32), torch.float32, seed + 4), _weights((32, 32), torch.float32, 9)
        ),
        "int64": torch.arange(4096, dtype=torch.int64) % 97,
        "int8": (torch.arange(4096) % 7).to(torch.int8),
        "bool": torch.arange(4096) % 3 == 0,
        "noise": torch.randint(
            0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
        ),
        "tiny": torch.tensor([1.5]),
        "bias": _weights((512,), torch.float32, seed + 7),  # under 4 KiB: one zstd frame
        "empty": torch.zeros(0, 3),
        "view": _weights((64, 64), torch.float32, seed + 6).t(),  # not contiguous
        "objects": {"pair": (1, "a" * 300), "dtype": torch.float16, "step": 7, "name": "run"},
    }


def _target() -> dict[str, Any]:
    """A load target shaped like :func:`_state`, holding other values."""
    return {
        key: (torch.zeros_like(value) if isinstance(value, torch.Tensor) else value)
        for key, value in _state(seed=50).items()
    }


def _codecs(uri: str) -> dict[str, str | None]:
    metadata = torchstow.storage_reader(uri).read_metadata()
    return {index.fqn: info.codec for index, info in metadata.storage_data.items()}


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest as version-1 JSON (every location in its entry), whatever its version."""
    return manifest_doc(path)


def _data_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("data-*.bin"))


def test_every_dtype_round_trips_bit_exact_and_smaller(tmp_path: Path) -> None:
    state = _state()
    raw, packed = tmp_path / "raw", tmp_path / "packed"
    torchstow.save(state, str(raw))
    torchstow.save(state, str(packed), compression="zstd")
    assert_same_state(torchstow.read(str(packed)), state)
    codecs = _codecs(str(packed))
    for key in ("fp32", "bf16", "fp16", "fp64", "cplx", "view"):
        assert codecs[key] == BYTEPLANES, key
    for key in ("int64", "int8", "bool", "objects.pair", "bias"):
        assert codecs[key] == ZSTD, key
    for key in ("noise", "tiny"):  # nothing to gain: stored as they are
        assert codecs[key] is None, key
    assert _data_bytes(packed) < 0.8 * _data_bytes(raw)
    entry = _manifest(packed)["entries"]["bf16"]
    assert entry["codec"] == BYTEPLANES and entry["length"] < 128 * 64 * 2
    assert "codec" not in _manifest(raw)["entries"]["bf16"]  # raw checkpoints are unchanged


def test_load_in_place_and_through_casts(tmp_path: Path) -> None:
    """Loading into tensors (decompressed straight into them) and into another dtype (through
    a scratch chunk) gives the saved values."""
    state = _state()
    uri = str(tmp_path / "c")
    torchstow.save(state, uri, compression="zstd")
    target = _target()
    torchstow.load(target, uri)
    assert_same_state(target, state)
    casted = {"fp32": torch.zeros(64, 64, dtype=torch.float64), "bf16": torch.zeros(128, 64)}
    torchstow.load(casted, uri, cast=True, strict=False)
    assert_same_state(casted, {"fp32": state["fp32"].double(), "bf16": state["bf16"].float()})


def test_async_save_round_trips(tmp_path: Path) -> None:
    state = _state()
    uri = str(tmp_path / "c")
    torchstow.async_save(state, uri, compression="zstd").result()
    assert _codecs(uri)["fp32"] == BYTEPLANES
    assert_same_state(torchstow.read(uri), state)


def test_mmap_read_decompresses_into_memory(tmp_path: Path) -> None:
    state = _state()
    uri = str(tmp_path / "c")
    torchstow.save(state, uri, compression="zstd")
    back = torchstow.read(uri, mmap=True)
    assert_same_state(back, state)
    assert back["noise"].untyped_storage().nbytes() > back["noise"].nbytes  # raw: a view of its mapped file
    assert back["fp32"].untyped_storage().nbytes() == back["fp32"].nbytes  # compressed: its own memory


def test_verify_checks_the_stored_bytes(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    torchstow.save(_state(), uri, compression="zstd")
    assert torchstow.verify(uri).ok


def _flip_byte_of(path: Path, key: str, at: int) -> None:
    entry = _manifest(path)["entries"][key]
    name = _manifest(path)["files"][entry["file"]]
    with open(path / name, "r+b") as f:
        f.seek(entry["offset"] + at)
        byte = f.read(1)[0]
        f.seek(entry["offset"] + at)
        f.write(bytes([byte ^ 0x10]))


def test_a_flipped_byte_in_a_compressed_chunk_is_a_checksum_mismatch_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c"
    torchstow.save(_state(), str(path), compression="zstd")
    _flip_byte_of(path, "bf16", 40)  # inside the exponent plane's zstd frame
    with pytest.raises(ChecksumMismatchError, match="'bf16'"):
        torchstow.read(str(path))
    with pytest.raises(ChecksumMismatchError, match="'bf16'"):
        torchstow.load(_target(), str(path))
    assert torchstow.read(str(path), keys=["fp32"])["fp32"].shape == (64, 64)  # the others still read
    assert not torchstow.verify(str(path)).ok


def test_an_unknown_codec_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c"
    torchstow.save(_state(), str(path), compression="zstd", format_version=1)  # rewritten as JSON
    doc = _manifest(path)
    doc["entries"]["fp32"]["codec"] = "lz4-evil"
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=r"entries\['fp32'\].*codec 'lz4-evil'"):
        torchstow.read(str(path))


def test_byte_planes_of_an_object_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    torchstow.save(
        {"o": {"text": ("x" * 4000,)}}, str(path), compression="zstd", format_version=1
    )  # rewritten as JSON
    doc = _manifest(path)
    assert doc["entries"]["o.text"]["codec"] == ZSTD
    doc["entries"]["o.text"]["codec"] = BYTEPLANES
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="needs a tensor"):
        torchstow.read(str(path))


@pytest.mark.parametrize(("key", "shape"), [("bf16", [128, 63]), ("int64", [4097]), ("int64", [0])])
def test_a_chunk_decompressing_to_another_size_is_corrupt(tmp_path: Path, key: str, shape: list[int]) -> None:
    """The manifest's shape (so the raw size) disagrees with what the stored bytes hold."""
    path = tmp_path / "c"
    torchstow.save(_state(), str(path), compression="zstd", format_version=1)  # rewritten as JSON
    doc = _manifest(path)
    doc["entries"][key]["shape"] = shape
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=rf"'{key}'.*(decompress|plane lengths)"):
        torchstow.read(str(path), keys=[key])


def test_hostile_plane_lengths_are_corrupt() -> None:
    data = _weights((1100,), torch.float32, 1)
    stored, codec = compress(tensor_bytes(data), torch.float32) or (b"", "")
    assert codec == BYTEPLANES
    lying = bytearray(stored)
    lying[0:8] = (1 << 62).to_bytes(8, "little")
    with pytest.raises(CorruptCheckpointError, match="plane lengths"):
        decompress_into(memoryview(lying), codec, torch.float32, torch.empty(1100))
    with pytest.raises(CorruptCheckpointError, match="plane lengths"):
        decompress_into(memoryview(bytearray(stored)), codec, torch.float32, torch.empty(1099))


def test_a_garbled_frame_is_corrupt_and_the_next_chunk_still_decodes(plane_compressor: str) -> None:
    """A frame that does not decode (past the checksums, as a hostile writer could make one)
    is a CorruptCheckpointError, and this thread's decompressor decodes the next chunk."""
    data = _weights((1100,), torch.float32, 2)
    stored, codec = compress(tensor_bytes(data), torch.float32) or (b"", "")
    assert codec == BYTEPLANES
    good = bytes(stored) if isinstance(stored, bytes) else bytes(tensor_bytes(stored))
    garbled = bytearray(good)
    garbled[32 + 4 : 32 + 12] = b"\xff" * 8  # the exponent plane's frame header, past the lengths
    for _ in range(2):
        with pytest.raises(CorruptCheckpointError, match="decompress"):
            decompress_into(memoryview(garbled), codec, torch.float32, torch.empty(1100))
        back = torch.empty(1100)
        decompress_into(memoryview(good), codec, torch.float32, back)
        assert torch.equal(back, data)


def test_unknown_compression_is_a_value_error_before_anything_is_written(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    for call in (
        lambda: torchstow.save(_state(), uri, compression="lz4"),
        lambda: torchstow.async_save(_state(), uri, compression="ZSTD"),
        lambda: torchstow.CheckpointManager(str(tmp_path / "run"), compression=True),
        lambda: torchstow.storage_writer(uri, compression="gzip"),
    ):
        with pytest.raises(ValueError, match="not a compression torchstow knows"):
            call()
    assert not os.path.exists(uri) and not os.path.exists(tmp_path / "run")


def test_a_tiered_manager_refuses_compression(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiered manager"):
        torchstow.CheckpointManager(str(tmp_path / "run"), fast=str(tmp_path / "fast"), compression="zstd")


def test_manager_compresses_every_save(tmp_path: Path) -> None:
    manager = torchstow.CheckpointManager(str(tmp_path / "run"), compression="zstd", keep_last=2)
    state = _state()
    manager.save(1, state)
    manager.save(2, state, asynchronous=True)
    manager.wait()
    for step in (1, 2):
        assert _codecs(manager.uri(step))["fp32"] == BYTEPLANES
    target = _target()
    manager.restore(target)
    assert_same_state(target, state)


def test_incremental_save_shares_compressed_items_with_its_base(tmp_path: Path) -> None:
    state = _state()
    first, second, plain = (str(tmp_path / n) for n in ("first", "second", "plain"))
    torchstow.save(state, first, compression="zstd")
    state["bf16"] = state["bf16"] * 2  # changed; everything else is not
    written = torchstow.save(state, second, base=first, compression="zstd")
    assert 0 < written.nbytes_written < 128 * 64 * 2
    assert _codecs(second)["fp32"] == BYTEPLANES
    assert_same_state(torchstow.read(second), state)
    # A raw save against a compressed base shares only what is stored raw in both.
    shared = torchstow.save(state, plain, base=second)
    md = torchstow.storage_reader(plain).read_metadata()
    assert {i.fqn for i, info in md.storage_data.items() if info.codec} == set()
    assert shared.nbytes_written > 0
    assert_same_state(torchstow.read(plain), state)


def test_incremental_with_trusted_version_counters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    uris = [str(tmp_path / f"s{i}") for i in range(4)]
    torchstow.save(state, uris[0], compression="zstd", trust_version_counter=True)
    torchstow.save(state, uris[1], base=uris[0], compression="zstd", trust_version_counter=True)
    again = torchstow.save(state, uris[2], base=uris[1], compression="zstd", trust_version_counter=True)
    base = torchstow.storage_reader(uris[1]).read_metadata().storage_data
    tensors = [i for i in again.storage_data if isinstance(state.get(i.fqn), torch.Tensor)]
    for index in tensors:  # every tensor item of some bytes shared, its codec carried over
        if not state[index.fqn].numel():
            continue
        assert again.storage_data[index] == base[index], index
    assert again.nbytes_written < 1000  # only the objects (never shared) were written
    raw = torchstow.save(state, uris[3], base=uris[2], trust_version_counter=True)  # other stored bytes
    assert raw.nbytes_written > 0
    assert "trust_version_counter" not in caplog.text  # a compressed digest is never taken for a raw one
    for uri in uris[1:]:
        assert_same_state(torchstow.read(uri), state)


def test_copy_keeps_stored_bytes_or_recompresses(tmp_path: Path) -> None:
    state = _state()
    raw, packed = str(tmp_path / "raw"), str(tmp_path / "packed")
    torchstow.save(state, raw)
    torchstow.save(state, packed, compression="zstd")
    kept = torchstow.copy(packed, str(tmp_path / "kept"))
    assert _codecs(kept) == _codecs(packed)
    assert _data_bytes(Path(kept)) == _data_bytes(Path(packed))
    squeezed = torchstow.copy(raw, str(tmp_path / "squeezed"), compression="zstd")
    assert _codecs(squeezed)["fp32"] == BYTEPLANES
    unpacked = torchstow.convert(packed, str(tmp_path / "unpacked"), to="torchstow").dst
    assert set(_codecs(unpacked).values()) == {None}
    for uri in (kept, squeezed, unpacked):
        assert_same_state(torchstow.read(uri), state)
    with pytest.raises(ValueError, match="torchstow targets"):
        torchstow.convert(raw, str(tmp_path / "st"), to="safetensors", compression="zstd")


def test_cli_convert_and_cp_compress(tmp_path: Path) -> None:
    state = _state()
    raw = str(tmp_path / "raw")
    torchstow.save(state, raw)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for args in (
        ["convert", raw, str(tmp_path / "conv"), "--to", "torchstow", "--compression", "zstd"],
        ["cp", raw, str(tmp_path / "cp"), "--compression", "zstd"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "torchstow.cli", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    for name in ("conv", "cp"):
        assert _codecs(str(tmp_path / name))["fp32"] == BYTEPLANES
        assert_same_state(torchstow.read(str(tmp_path / name)), state)


def test_dcp_reads_a_compressed_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = _state()
    uri = str(tmp_path / "c")
    torchstow.save(state, uri, compression="zstd")
    target = _target()
    dcp.load(target, storage_reader=torchstow.dcp_storage_reader(uri), no_dist=True)
    assert_same_state(target, state)


@pytest.mark.parametrize("compression", ["zstd", None])
def test_large_made_items_written_across_flushes(tmp_path: Path, compression: str | None) -> None:
    """Items whose stored bytes span several write batches (8 MiB) stay whole: a buffer made
    for one (its compressed bytes, or a contiguous copy of a transposed tensor) lives until its
    last piece is written, though nothing else holds it."""
    big = (1536, 2048)  # 12 MiB: its stored tail is still queued when the next item is made
    state = {"a": _weights(big, torch.float32, 1).t(), "b": _weights((64, 64), torch.float32, 2)}
    state.update(c=_weights(big, torch.float32, 3).t(), d=_weights(big, torch.float32, 4).t())
    uri = str(tmp_path / "c")
    for _ in range(2):  # one writer thread: the items in this order, in one file
        options = {"thread_count": 1}
        torchstow.save(state, uri, compression=compression, overwrite=True, storage_options=options)
        assert_same_state(torchstow.read(uri), state)


def test_read_once_reads_a_compressed_chunk_whole_once(tmp_path: Path) -> None:
    """Two ranks loading the row halves of an 8 MiB chunk (two checksum blocks) each read
    their own block when it is raw; compressed, each would read and decompress all of it,
    so one rank reads it whole and sends the other its half."""
    from dataclasses import replace

    from torchstow.core.planning import DefaultLoadPlanner, LoadPlan
    from torchstow.core.planning.read_once import ReadOnceProbe, plan_read_once

    torchstow.save({"m": torch.zeros(2048, 1024)}, str(tmp_path / "c"))
    raw = torchstow.storage_reader(str(tmp_path / "c")).read_metadata()

    def halves(metadata: Any) -> list[LoadPlan]:
        plans = []
        for half in range(2):
            planner = DefaultLoadPlanner()
            planner.set_up_planner({"m": torch.zeros(2048, 1024)}, metadata)
            (item,) = planner.create_local_plan().items
            rows = torch.Size([1024 * half, 0])
            plans.append(LoadPlan([replace(item, storage_offsets=rows, lengths=torch.Size([1024, 1024]))]))
        return plans

    roles = plan_read_once(halves(raw), raw, [ReadOnceProbe("a")] * 2)
    assert sum(len(role.chunks) for role in roles) == 0  # each reads its own half
    packed = replace(raw, storage_data={i: replace(info, codec=ZSTD) for i, info in raw.storage_data.items()})
    roles = plan_read_once(halves(packed), packed, [ReadOnceProbe("a")] * 2)
    assert sum(len(role.chunks) for role in roles) == 1  # one reads it whole, once


def _spec_planes(t: torch.Tensor) -> list[bytes]:
    """The byte planes of a tensor as docs/format.md defines them, one element at a time:
    plane j holds byte k-1-j of every element's little-endian bytes."""
    k = t.element_size()
    raw = bytes(tensor_bytes(t.contiguous()))
    return [raw[k - 1 - j :: k] for j in range(k)]


def _spec_encode(t: torch.Tensor, squeeze: list[bool]) -> bytes:
    """Stored bytes of ``byteplanes-zstd`` made by the letter of the format (plane j a
    zstd frame at the default level where ``squeeze[j]``, else as it is), as any writer,
    this one's earlier versions included, may have made them (a frame no shorter than its
    plane is not one: the plane is kept as it is)."""
    import struct

    import zstandard

    planes = []
    for plane, wanted in zip(_spec_planes(t), squeeze, strict=True):
        frame = zstandard.ZstdCompressor().compress(plane) if wanted else plane
        planes.append(frame if len(frame) < len(plane) else plane)  # a frame is shorter than n
    return struct.pack(f"<{len(planes)}Q", *map(len, planes)) + b"".join(planes)


_PLANE_CASES = [
    (torch.float32, (1100,)),
    (torch.bfloat16, (3, 777)),
    (torch.float16, (2, 1200)),
    (torch.float64, (517,)),
    (torch.complex64, (600,)),
    (torch.complex128, (400,)),  # 16-byte elements
]


@pytest.mark.parametrize(
    ("dtype", "shape"), [*_PLANE_CASES, (torch.float16, (2,)), (torch.float32, (1,)), (torch.float32, (0,))]
)
def test_byte_planes_decode_by_the_letter_of_the_format(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Stored bytes laid out as docs/format.md says (any mix of planes compressed and kept as
    they are) decode bit-exact: checkpoints written before keep loading, whatever wrote them."""
    t = _weights(shape, dtype, 3)
    k = t.element_size()
    for squeeze in ([True] * k, [False] * k, [j % 2 == 0 for j in range(k)]):
        stored = _spec_encode(t, squeeze)
        out = torch.full_like(t, 7) if t.numel() else torch.empty_like(t)
        decompress_into(memoryview(stored), BYTEPLANES, dtype, out)
        assert bytes(tensor_bytes(out)) == bytes(tensor_bytes(t)), squeeze


@pytest.fixture(params=["libzstd", "zstandard"])
def plane_compressor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Byte planes compressed, and whole frames decoded (by one libzstd call), through
    zstandard's cffi binding of libzstd where the cffi package is installed, or through
    zstandard's own API (frames streamed) where it is not."""
    from torchstow.core.layout import compression

    if request.param == "libzstd":
        pytest.importorskip("zstandard.backend_cffi", reason="the cffi package is not installed")
    else:
        monkeypatch.setattr(compression, "_lib", None)
    made = vars(compression._local)  # this thread's compressors: the one of planes made anew
    kept = made.pop("planes", None)
    yield request.param
    made.pop("planes", None)
    if kept is not None:
        made["planes"] = kept


def test_byte_planes_go_through_libzstd_where_cffi_is_installed(plane_compressor: str) -> None:
    """The faster compressor of exponent planes is the one used, not silently lost."""
    from torchstow.core.layout import compression

    made = compression._compressor(planes=True)
    assert isinstance(made, compression._LibzstdPlanes) == (plane_compressor == "libzstd")


@pytest.mark.parametrize(("dtype", "shape"), _PLANE_CASES)
def test_byte_planes_written_follow_the_letter_of_the_format(
    dtype: torch.dtype, shape: tuple[int, ...], plane_compressor: str
) -> None:
    """What compress writes reads back plane by plane as docs/format.md says: k lengths, then
    each plane, as it is (n bytes) or one zstd frame of it, and decodes bit-exact."""
    import struct

    import zstandard

    t = _weights(shape, dtype, 4)
    t.view(torch.uint8).view(-1)[-1] ^= 0x5A  # the last element's bytes: split apart from the rest
    found = compress(tensor_bytes(t), dtype)
    assert found is not None and found[1] == BYTEPLANES
    stored = bytes(found[0]) if isinstance(found[0], bytes) else bytes(tensor_bytes(found[0]))
    k, n = t.element_size(), t.numel()
    lengths = struct.unpack_from(f"<{k}Q", stored)
    pos = 8 * k
    for j, plane in enumerate(_spec_planes(t)):
        piece = stored[pos : pos + lengths[j]]
        pos += lengths[j]
        assert (piece if len(piece) == n else zstandard.ZstdDecompressor().decompress(piece)) == plane, j
    assert pos == len(stored) and any(length < n for length in lengths)
    back = torch.empty_like(t)
    decompress_into(memoryview(stored), BYTEPLANES, dtype, back)
    assert bytes(tensor_bytes(back)) == bytes(tensor_bytes(t))


def _stored_bytes(found: tuple[bytes | torch.Tensor, str] | None) -> bytes:
    assert found is not None
    return bytes(found[0]) if isinstance(found[0], bytes) else bytes(tensor_bytes(found[0]))


@pytest.mark.parametrize("piece", [64, 1000, 4096])
@pytest.mark.parametrize(
    ("dtype", "shape"), [*_PLANE_CASES, (torch.float16, (2,)), (torch.float32, (1,)), (torch.float64, (9,))]
)
def test_byte_planes_join_a_piece_at_a_time_with_boundaries_anywhere(
    dtype: torch.dtype, shape: tuple[int, ...], piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planes are joined a piece of the chunk at a time, each compressed plane streamed by its
    own decompressor side by side with the others: pieces of a few elements, chunks ending
    mid-piece and chunks shorter than one piece, any mix of planes compressed and kept as
    they are, all decode bit-exact."""
    from torchstow.core.layout import compression

    monkeypatch.setattr(compression, "_PIECE", piece)
    t = _weights(shape, dtype, 5)
    k = t.element_size()
    for squeeze in ([True] * k, [False] * k, [j % 2 == 1 for j in range(k)]):
        out = torch.full_like(t, 7)
        decompress_into(memoryview(_spec_encode(t, squeeze)), BYTEPLANES, dtype, out)
        assert bytes(tensor_bytes(out)) == bytes(tensor_bytes(t)), squeeze


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_a_chunk_of_several_pieces_round_trips(dtype: torch.dtype) -> None:
    """At the real piece size: two whole pieces and a part of one."""
    from torchstow.core.layout import compression

    t = _weights((2 * compression._PIECE // dtype.itemsize + 77,), dtype, 6)
    stored = _stored_bytes(compress(tensor_bytes(t), dtype))
    back = torch.empty_like(t)
    decompress_into(memoryview(stored), BYTEPLANES, dtype, back)
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_a_plane_frame_ending_early_or_late_is_corrupt_and_the_next_chunk_decodes(
    monkeypatch: pytest.MonkeyPatch, plane_compressor: str
) -> None:
    """A frame of a plane that holds too few or too many bytes, or is cut or followed by junk
    (past the checksums, as a hostile writer could make them), is a CorruptCheckpointError
    wherever in the chunk its piece falls; this thread's decompressors decode the next chunk."""
    import struct

    import zstandard

    from torchstow.core.layout import compression

    monkeypatch.setattr(compression, "_PIECE", 256)
    t = _weights((1000,), torch.float32, 7)
    planes = _spec_planes(t)
    frame = zstandard.ZstdCompressor().compress

    def stored(first: bytes, second: bytes) -> bytes:
        rest = [first, second, *planes[2:]]
        return struct.pack("<4Q", *map(len, rest)) + b"".join(rest)

    lying = {
        "fewer": stored(frame(planes[0][:-1]), planes[1]),
        "more": stored(frame(planes[0] + b"\0"), planes[1]),
        "cut": stored(frame(planes[0])[:-3], planes[1]),
        "junk": stored(frame(planes[0]) + b"junk", planes[1]),
        "second plane fewer": stored(frame(planes[0]), frame(bytes(400))),
    }
    for name, bad in lying.items():
        with pytest.raises(CorruptCheckpointError, match="decompress"):
            decompress_into(memoryview(bad), BYTEPLANES, torch.float32, torch.empty(1000))
        back = torch.empty(1000)
        decompress_into(memoryview(stored(frame(planes[0]), planes[1])), BYTEPLANES, torch.float32, back)
        assert torch.equal(back, t), name


def test_a_flipped_byte_in_a_later_piece_is_a_checksum_mismatch_naming_the_key(tmp_path: Path) -> None:
    from torchstow.core.layout import compression

    path = tmp_path / "c"
    big = _weights((3 * compression._PIECE // 2,), torch.bfloat16, 8)  # three pieces
    torchstow.save({"big": big, "small": torch.ones(8)}, str(path), compression="zstd")
    entry = _manifest(path)["entries"]["big"]
    assert entry["codec"] == BYTEPLANES
    _flip_byte_of(path, "big", entry["length"] - 100)  # the low bytes of the last piece
    with pytest.raises(ChecksumMismatchError, match="'big'"):
        torchstow.read(str(path))
    assert torch.equal(torchstow.read(str(path), keys=["small"])["small"], torch.ones(8))


@pytest.mark.parametrize("where", ["tail", "stream", "zstd"])
@pytest.mark.parametrize("junk", [b"\x28", b"\x28\xb5", b"\x28\xb5\x2f\xfd", b"\x28\xb5\x2f\xfd\x04"])
def test_a_frame_followed_by_the_start_of_another_is_corrupt(where: str, junk: bytes) -> None:
    """Junk after a whole frame too short to be a frame header (the first bytes of one), after
    the plane decompressed into the chunk's tail, after a streamed plane, or after a zstd
    chunk, is a CorruptCheckpointError, not bytes silently ignored."""
    import struct

    import zstandard

    frame = zstandard.ZstdCompressor().compress
    t = (torch.arange(1000) % 16).float()  # its first two planes shrink
    planes = _spec_planes(t)

    def stored(first: bytes, second: bytes) -> bytes:
        rest = [first, second, *planes[2:]]
        return struct.pack("<4Q", *map(len, rest)) + b"".join(rest)

    lying = {
        "tail": (stored(frame(planes[0]) + junk, frame(planes[1])), BYTEPLANES),
        "stream": (stored(frame(planes[0]), frame(planes[1]) + junk), BYTEPLANES),
        "zstd": (frame(bytes(tensor_bytes(t))) + junk, ZSTD),
    }
    bad, codec = lying[where]
    with pytest.raises(CorruptCheckpointError, match="decompress"):
        decompress_into(memoryview(bad), codec, torch.float32, torch.empty(1000))
    back = torch.empty(1000)
    decompress_into(memoryview(stored(frame(planes[0]), frame(planes[1]))), BYTEPLANES, torch.float32, back)
    assert torch.equal(back, t)


def _rle_frame(declared: int, produced: int) -> bytes:
    """A zstd frame of one RLE block of ``produced`` zero bytes whose header declares
    ``declared`` bytes (about 16 bytes, however much either says)."""
    block = (1 | 1 << 1 | produced << 3).to_bytes(3, "little")  # the last block, RLE
    return struct.pack("<IBQ", 0xFD2FB528, 0xE0, declared) + block + b"\0"


def _store_object_bytes(path: Path, key: str, stored: bytes) -> None:
    """Make ``stored`` the stored bytes of object ``key`` (appended to its data file,
    with a checksum that matches): what a hostile checkpoint can hold."""
    doc = _manifest(path)
    entry = doc["entries"][key]
    with open(path / doc["files"][entry["file"]], "ab") as f:
        entry["offset"] = f.tell()
        f.write(stored)
    entry["length"] = len(stored)
    entry["crc32c"] = [crc32c.crc32c(stored)]
    (path / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("stored", "error"),
    [
        (_rle_frame(1 << 62, 1 << 17), "more than this machine's memory"),  # no allocation tried
        (_rle_frame(1000, 1 << 17), "does not decompress to the 1000 bytes it declares"),
        (_rle_frame(1 << 20, 1 << 17), "does not decompress to the 1048576 bytes it declares"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 100), "does not declare"),
    ],
    ids=["claims-exabytes", "more-than-declared", "less-than-declared", "no-size"],
)
def test_an_objects_frame_that_lies_about_its_size_is_corrupt_naming_the_key(
    tmp_path: Path, stored: bytes, error: str
) -> None:
    path = tmp_path / "c"
    torchstow.save(
        {"o": {"text": ("x" * 4000,)}, "t": torch.ones(3)}, str(path), compression="zstd", format_version=1
    )
    _store_object_bytes(path, "o.text", stored)
    with pytest.raises(CorruptCheckpointError, match=rf"'o\.text'.*{error}"):
        torchstow.read(str(path))
    assert torch.equal(torchstow.read(str(path), keys=["t"])["t"], torch.ones(3))  # the rest still reads


def _expanding_frame(blocks: int) -> bytes:
    """A valid zstd frame of ``blocks`` RLE blocks of 128 KiB zeros each, declaring exactly
    what it decodes to (4 bytes stored for each 128 KiB), with a 128 KiB window."""
    block = 1 << 17
    header = struct.pack("<IBBQ", 0xFD2FB528, 0xC0, 7 << 3, blocks * block)
    body = b"".join(
        ((i == blocks - 1) | 1 << 1 | block << 3).to_bytes(3, "little") + b"\0" for i in range(blocks)
    )
    return header + body


@pytest.mark.skipif(not hasattr(os, "sysconf") or sys.platform != "linux", reason="RLIMIT_AS is Linux's")
def test_an_object_expanding_past_what_the_process_may_allocate_is_a_documented_error(tmp_path: Path) -> None:
    """64 KiB stored, 2 GiB decoded, under an address-space limit 512 MiB above what the
    process maps now: a CorruptCheckpointError naming the key, not a bare MemoryError."""
    import resource

    path = tmp_path / "c"
    torchstow.save({"o": {"text": ("x" * 4000,)}}, str(path), compression="zstd", format_version=1)
    _store_object_bytes(path, "o.text", _expanding_frame(1 << 14))
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (512 << 20), hard))
    try:
        with pytest.raises(CorruptCheckpointError, match=r"'o\.text'.*more than can be allocated"):
            torchstow.read(str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
