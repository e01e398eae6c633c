"""The repository key (`--backup-key-file`) and the sub-keys derived from it.

The key file holds 32 random bytes written as 64 hexadecimal digits or as standard base64
(44 characters with padding); surrounding whitespace is ignored. Make one with
``head -c 32 /dev/urandom | base64``. Every sub-key is HKDF-SHA256(key, salt = empty,
info = label) with the labels below; the key ID is a derived value that identifies the key
without revealing it. Errors never quote the file's content.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from driver import errors

KEY_BYTES = 32
LABEL_KEY_ID = b"stowage-backup/v1/key-id"
LABEL_CHUNK_ID = b"stowage-backup/v1/chunk-id"
LABEL_CHUNK = b"stowage-backup/v1/chunk"
LABEL_MANIFEST = b"stowage-backup/v1/manifest"
KEY_ID_BYTES = 16

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def hkdf(key: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(key)


@dataclass(frozen=True)
class RepositoryKey:
    """The master key and its derived sub-keys. repr() never shows key material."""

    key_id: str
    chunk_id_key: bytes
    chunk_key: bytes
    manifest_key: bytes

    def __repr__(self) -> str:
        return f"RepositoryKey(key_id={self.key_id})"

    @classmethod
    def from_bytes(cls, master: bytes) -> RepositoryKey:
        if len(master) != KEY_BYTES:
            raise errors.InvalidArgument(f"a backup key is {KEY_BYTES} bytes, got {len(master)}")
        return cls(
            key_id=hkdf(master, LABEL_KEY_ID, KEY_ID_BYTES).hex(),
            chunk_id_key=hkdf(master, LABEL_CHUNK_ID),
            chunk_key=hkdf(master, LABEL_CHUNK),
            manifest_key=hkdf(master, LABEL_MANIFEST),
        )

    @classmethod
    def parse(cls, text: str, source: str = "the backup key") -> RepositoryKey:
        value = text.strip()
        if _HEX.fullmatch(value):
            return cls.from_bytes(bytes.fromhex(value))
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != KEY_BYTES:
            raise errors.InvalidArgument(
                f"{source} must hold {KEY_BYTES} random bytes as 64 hex digits or base64 "
                "(make one with: head -c 32 /dev/urandom | base64)"
            )
        return cls.from_bytes(raw)

    @classmethod
    def load(cls, path: str) -> RepositoryKey:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                text = fh.read(4096)
        except FileNotFoundError as exc:
            raise errors.InvalidArgument(f"backup key file {path} does not exist") from exc
        except OSError as exc:
            raise errors.InvalidArgument(
                f"backup key file {path} cannot be read: {exc.strerror}"
            ) from exc
        return cls.parse(text, f"backup key file {path}")
