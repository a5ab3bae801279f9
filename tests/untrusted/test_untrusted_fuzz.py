"""Manifest bytes mutated at random: info, read, load and latest either raise a documented
error or hand back the saved bytes - never another exception, never other memory."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tamper import manifest_path, save_original, tensor_bytes_of, write_bytes, zeros_like_original

import torchstow

DOCUMENTED = (
    torchstow.CorruptCheckpointError,
    torchstow.ChecksumMismatchError,
    torchstow.FormatVersionError,
    torchstow.StateDictMismatchError,
    torchstow.PickleNotAllowedError,
    torchstow.IncompleteCheckpointError,
)

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["data-../x.bin", "../x", "/etc/passwd", "float64", "int8", "json", "pickle", "torch"]),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every node of a JSON document."""
    out = [path]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _nodes(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _nodes(value, (*path, i))
    return out


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@st.composite
def mutated(draw: Any, text: bytes) -> bytes:
    """A manifest changed at the JSON level (a node replaced) or at the byte level."""
    if draw(st.booleans()):
        doc = json.loads(text)
        path = draw(st.sampled_from(_nodes(doc)))
        return json.dumps(_replace(doc, path, draw(_json))).encode()
    data = bytearray(text)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "digit", "delete", "insert"]))
        if action == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "digit":
            data[pos] = ord(draw(st.sampled_from("0123456789-")))
        elif action == "delete":
            del data[pos]
        else:
            data[pos:pos] = draw(st.sampled_from([b"9", b"-", b"[", b"{}", b'"', b",0", b"e9"]))
    return bytes(data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: Any) -> tuple[str, bytes, list[bytes]]:
    root = str(tmp_path_factory.mktemp("fuzz"))
    path = save_original(os.path.join(root, "step-1"))
    with open(manifest_path(path), "rb") as f:
        text = f.read()
    return path, text, tensor_bytes_of(torchstow.read(path))


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_manifests_give_documented_errors_or_the_saved_bytes(
    pristine: tuple[str, bytes, list[bytes]], data: Any
) -> None:
    path, text, saved = pristine
    blob = data.draw(mutated(text))
    write_bytes(path, blob)
    try:
        for call in (lambda: torchstow.info(path), lambda: torchstow.read(path)):
            try:
                result = call()
            except DOCUMENTED:
                continue
            for got in tensor_bytes_of(result if isinstance(result, dict) else {}):
                assert not got or got in saved, "read returned bytes that were never saved"
        target = zeros_like_original()
        try:
            torchstow.load(target, path)
        except DOCUMENTED:
            pass
        else:
            for got in tensor_bytes_of(target):
                assert got in saved, "load reported success but a target holds bytes never saved"
        assert torchstow.latest(os.path.dirname(path)) in (path, None)
    finally:
        write_bytes(path, text)


def test_the_fuzzed_checkpoint_is_a_real_one(pristine: tuple[str, bytes, list[bytes]]) -> None:
    path, _, saved = pristine
    got = torchstow.read(path)
    assert torch.equal(got["w"], torch.arange(12, dtype=torch.float32).reshape(4, 3))
    assert sorted(tensor_bytes_of(got)) == sorted(saved)
