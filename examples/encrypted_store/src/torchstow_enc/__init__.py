"""``enc+<any uri>``: torchstow checkpoints whose data files are encrypted at rest.

Each data file is a small header (magic, block size, a random per-file salt) followed by
blocks of ``block_size`` plaintext bytes, each sealed with AES-GCM (ciphertext + 16-byte
tag). A block's nonce is derived from the salt, the file name and the block index, and
its associated data binds the header, the name, the index and whether it is the last
block, so blocks cannot be swapped, moved between files or cut off unnoticed. A ranged
read decrypts only the blocks it touches.

The manifest is left in plaintext (names, shapes, dtypes, checksums, small JSON values
and user metadata, no tensor bytes), so ``ls``, ``info`` and ``du`` need no key.

Storage options: ``enc.key`` (hex, 16, 24 or 32 bytes; default: the environment variable
``TORCHSTOW_ENC_KEY``) and ``enc.block_size`` (plaintext bytes per block, default 1 MiB:
the size of the ranges torchstow's loader asks for, so each block is decrypted once per
load; docs/benchmarks.md measured 34x the plain load time with 4 MiB blocks, 2x with 1 MiB).
Every other option goes to the wrapped backend.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

from torchstow.spi import (
    REQUIRED,
    Buffer,
    ByteStore,
    CorruptCheckpointError,
    FileSink,
    ForwardingByteStore,
    Register,
    WrapperBackend,
    hookimpl,
    is_manifest_file,
)

__all__ = ["KEY_ENV", "EncryptedStore", "EncryptingBackend"]

KEY_ENV = "TORCHSTOW_ENC_KEY"
MAGIC = b"TSENC\x00\x01\x00"
HEADER = struct.Struct("<8sI4x16s")  # magic, block size, (reserved), salt
TAG = 16


def _aesgcm(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # imported when data is touched

    return AESGCM(key)


def parse_key(text: str) -> bytes:
    """A hex key of 16, 24 or 32 bytes; ValueError otherwise (never echoing the key)."""
    try:
        key = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError("enc.key must be hex digits (32, 48 or 64 of them)") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"enc.key must be 16, 24 or 32 bytes (32, 48 or 64 hex digits), got {len(key)}")
    return key


class _Cipher:
    """The sealing of one file: its header, and each block's nonce and associated data."""

    def __init__(self, aead: Any, name: str, header: bytes) -> None:
        magic, self.block_size, self.salt = HEADER.unpack(header)
        if magic != MAGIC or self.block_size < 1:
            raise ValueError("not an enc+ file")
        self.aead, self.name, self.header = aead, name.encode(), header

    def _nonce_and_ad(self, index: int, last: bool) -> tuple[bytes, bytes]:
        nonce = hashlib.sha256(self.salt + self.name + index.to_bytes(8, "little")).digest()[:12]
        return nonce, self.header + self.name + index.to_bytes(8, "little") + bytes([last])

    def seal(self, index: int, data: Buffer, last: bool) -> bytes:
        nonce, ad = self._nonce_and_ad(index, last)
        return bytes(self.aead.encrypt(nonce, bytes(data), ad))

    def open(self, index: int, data: bytes, last: bool, where: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        nonce, ad = self._nonce_and_ad(index, last)
        try:
            return bytes(self.aead.decrypt(nonce, data, ad))
        except InvalidTag:
            raise CorruptCheckpointError(
                f"{where}: block {index} fails authentication: wrong enc.key, or the file was damaged"
            ) from None


class _EncryptingSink(FileSink):
    """Collects plaintext into blocks and writes each one sealed."""

    keeps_buffers = False  # every byte is copied into the pending block

    def __init__(self, inner: FileSink, cipher: _Cipher) -> None:
        self.inner, self.cipher = inner, cipher
        self.pending = bytearray()
        self.index = 0
        self.inner.write([cipher.header])

    def write(self, buffers: Sequence[Buffer]) -> None:
        size = self.cipher.block_size
        sealed: list[bytes] = []
        for buf in buffers:
            view = memoryview(buf).cast("B")
            pos = 0
            while pos < len(view):
                if len(self.pending) == size:  # a full block, and more bytes follow: not the last
                    sealed.append(self.cipher.seal(self.index, self.pending, last=False))
                    self.index += 1
                    self.pending.clear()
                take = min(size - len(self.pending), len(view) - pos)
                self.pending += view[pos : pos + take]
                pos += take
        if sealed:
            self.inner.write(sealed)

    def close(self) -> None:
        self.inner.write([self.cipher.seal(self.index, self.pending, last=True)])
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class EncryptedStore(ForwardingByteStore):
    """The inner store with every file but the manifest encrypted (see the module docstring)."""

    transforms_bytes = True  # what lies at rest is not what torchstow wrote: no mapping, no sharing

    def __init__(self, inner: ByteStore, backend: EncryptingBackend) -> None:
        super().__init__(inner)
        self.backend = backend
        self._sizes: dict[str, int] = {}

    def _new_cipher(self, name: str) -> _Cipher:
        header = HEADER.pack(MAGIC, self.backend.block_size, os.urandom(16))
        return _Cipher(self.backend.aead(), name, header)

    def _cipher(self, name: str, header: bytes) -> _Cipher:
        try:
            return _Cipher(self.backend.aead(), name, header)
        except (ValueError, struct.error):
            raise CorruptCheckpointError(f"{self.location}/{name} is not an enc+ encrypted file") from None

    def _seal_whole(self, name: str, data: bytes) -> bytes:
        cipher = self._new_cipher(name)
        size = cipher.block_size
        count = max(1, -(-len(data) // size))
        blocks = [cipher.seal(i, data[i * size : (i + 1) * size], last=i == count - 1) for i in range(count)]
        return cipher.header + b"".join(blocks)

    def _open_whole(self, name: str, data: bytes) -> bytes:
        cipher = self._cipher(name, data[: HEADER.size])
        step = cipher.block_size + TAG
        body = data[HEADER.size :]
        count = max(1, -(-len(body) // step))
        where = f"{self.location}/{name}"
        return b"".join(
            cipher.open(i, body[i * step : (i + 1) * step], i == count - 1, where) for i in range(count)
        )

    def create(self, name: str) -> FileSink:
        return _EncryptingSink(self.inner.create(name), self._new_cipher(name))

    def publish(self, name: str, data: bytes) -> None:
        self.inner.publish(name, data if is_manifest_file(name) else self._seal_whole(name, data))

    def publish_new(self, name: str, data: bytes) -> None:
        self.inner.publish_new(name, data if is_manifest_file(name) else self._seal_whole(name, data))

    def read_file(self, name: str) -> bytes:
        data = self.inner.read_file(name)
        return data if is_manifest_file(name) else self._open_whole(name, data)

    def _stored_size(self, name: str) -> int:
        if name not in self._sizes:
            sizes = self.inner.file_sizes()
            if sizes is None:
                raise CorruptCheckpointError(
                    f"{self.location}: enc+ reads ranges only from stores that report file sizes"
                )
            self._sizes = sizes
            if name not in sizes:
                raise FileNotFoundError(f"{self.location}/{name}")
        return self._sizes[name]

    def read_into(self, name: str, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Decrypts each block the requests touch, once, from one ranged read per run of blocks."""
        stored = self._stored_size(name)
        header = bytearray(HEADER.size)
        self.inner.read_into(name, [(0, memoryview(header))])
        cipher = self._cipher(name, bytes(header))
        size, step = cipher.block_size, cipher.block_size + TAG
        count = max(1, -(-(stored - HEADER.size) // step))
        plain_size = stored - HEADER.size - count * TAG
        wanted: set[int] = set()
        for offset, buf in requests:
            if offset + len(buf) > plain_size:
                raise CorruptCheckpointError(
                    f"{self.location}/{name} is truncated at offset {plain_size}: "
                    f"a read asks for bytes up to {offset + len(buf)}"
                )
            if len(buf):
                wanted.update(range(offset // size, (offset + len(buf) - 1) // size + 1))
        runs: list[list[int]] = []
        for index in sorted(wanted):
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        raw = {
            run[0]: bytearray(min(stored, HEADER.size + (run[-1] + 1) * step) - HEADER.size - run[0] * step)
            for run in runs
        }
        self.inner.read_into(
            name, [(HEADER.size + first * step, memoryview(buf)) for first, buf in raw.items()]
        )
        where = f"{self.location}/{name}"
        plain: dict[int, bytes] = {}
        for run in runs:
            data = raw[run[0]]
            for k, index in enumerate(run):
                plain[index] = cipher.open(
                    index, bytes(data[k * step : (k + 1) * step]), index == count - 1, where
                )
        for offset, buf in requests:
            out = buf.cast("B") if buf.format != "B" else buf
            pos = 0
            while pos < len(out):
                index, within = divmod(offset + pos, size)
                chunk = plain[index][within : within + len(out) - pos]
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)


class EncryptingBackend(WrapperBackend):
    """``enc+<inner uri>``: the inner backend's stores, seen through :class:`EncryptedStore`."""

    schemes = ("enc",)
    options: ClassVar[dict[str, Any]] = {"key": REQUIRED, "block_size": 1 << 20}
    data_options = frozenset({"key"})  # ls, info and du read only the plaintext manifest

    def __init__(self, **storage_options: Any) -> None:
        super().__init__(**storage_options)
        self.block_size = int(self.own_options["block_size"])
        if self.block_size < 1:
            raise ValueError(f"enc.block_size must be at least 1, got {self.block_size}")
        if self.own_options["key"] is REQUIRED and os.environ.get(KEY_ENV):
            self.own_options["key"] = os.environ[KEY_ENV]
        self._aead: Any = None

    def aead(self) -> Any:
        """The AES-GCM cipher of the key (a TypeError naming ``enc.key`` and the variable if none)."""
        if self._aead is None:
            if self.own_options["key"] is REQUIRED:
                raise TypeError(
                    f"enc+ needs a key to read or write data: the storage option enc.key "
                    f"(-o enc.key=HEX) or the environment variable {KEY_ENV}"
                )
            self._aead = _aesgcm(parse_key(str(self.option("key"))))
        return self._aead

    def storage_writer(self, uri: str, *, overwrite: bool = False) -> Any:
        self.aead()  # a missing or malformed key fails before anything is written
        return super().storage_writer(uri, overwrite=overwrite)

    def wrap_store(self, store: ByteStore, uri: str) -> ByteStore:
        return EncryptedStore(store, self)


@hookimpl
def torchstow_register_backends(register: Register) -> None:
    """Register ``enc+<inner uri>``."""
    register(EncryptingBackend)
