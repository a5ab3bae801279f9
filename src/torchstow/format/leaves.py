"""Encoding of non-tensor leaves: inline JSON, restricted torch bytes, or gated pickle."""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import torch

from torchstow.errors import CorruptCheckpointError, PickleNotAllowedError

JSON = "json"
TORCH = "torch"
PICKLE = "pickle"

__all__ = [
    "JSON",
    "PICKLE",
    "TORCH",
    "check_unpickling_allowed",
    "decode_object",
    "encode_object",
    "is_json_value",
    "is_utf8",
]


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (False when it holds a lone surrogate such as
    ``"\\ud800"``, which Python strings allow and UTF-8 JSON cannot carry)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_json_value(value: Any) -> bool:
    """True when ``value`` survives a JSON round trip exactly.

    Only exact built-in types count (an ``IntEnum`` is not an int here), floats
    must be finite, strings UTF-8 (no lone surrogate), and dict keys strings;
    tuples are not JSON.
    """
    kind = type(value)
    if kind is str:
        return is_utf8(value)
    if value is None or kind is int or kind is bool:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(is_json_value(v) for v in value)
    if kind is dict:
        return all(type(k) is str and is_utf8(k) and is_json_value(v) for k, v in value.items())
    return False


def encode_object(fqn: str, value: Any, *, allow_pickle: bool) -> tuple[str, bytes]:
    """Serialize a non-JSON leaf, preferring what ``torch.load(weights_only=True)`` reads.

    Returns ``(encoding, payload)``. A value that only full pickle can restore
    raises :class:`PickleNotAllowedError` unless ``allow_pickle``.
    """
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ValueError(f"{fqn}: cannot serialize a {type(value).__name__}: {exc}") from exc
    payload = buf.getvalue()
    try:
        torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # the restricted unpickler rejects the value's types
        if not allow_pickle:
            raise PickleNotAllowedError(
                f"{fqn}: a {type(value).__name__} can only be stored with full pickle, which "
                "runs arbitrary code on load; pass allow_pickle=True to save (and to load) "
                "it, or store a JSON value or tensor instead"
            ) from exc
        return PICKLE, payload
    return TORCH, payload


def check_unpickling_allowed(fqn: str, encoding: str, *, allow_pickle: bool) -> None:
    """Raise :class:`PickleNotAllowedError` if ``encoding`` needs a pickle not allowed."""
    if encoding == PICKLE and not allow_pickle:
        raise PickleNotAllowedError(
            f"{fqn} was saved with full pickle, and unpickling runs arbitrary code; "
            "pass allow_pickle=True only if you trust this checkpoint"
        )


def decode_object(fqn: str, encoding: str, payload: bytes, *, allow_pickle: bool) -> Any:
    """Inverse of :func:`encode_object`."""
    check_unpickling_allowed(fqn, encoding, allow_pickle=allow_pickle)
    if encoding not in (TORCH, PICKLE):
        raise CorruptCheckpointError(f"{fqn}: unknown object encoding {encoding!r}")
    try:
        return torch.load(io.BytesIO(payload), weights_only=encoding == TORCH, map_location="cpu")
    except Exception as exc:  # bytes that match their checksums but are no torch.save payload
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
        raise CorruptCheckpointError(f"{fqn!r}: the stored bytes do not decode ({reason})") from exc
