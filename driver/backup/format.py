"""The repository format: object names, sealed chunks and manifests (docs/backup-format.md).

Chunk object  ``chunks/<id[0:2]>/<id>``:  b"STC1" | nonce (12) | AES-256-GCM(chunk key, nonce,
zstd(plaintext), aad = b"stowage-chunk-v1:" + id). The ID is BLAKE3 keyed with the chunk-ID key
over the plaintext, 64 hex digits; opening a chunk checks the tag and then recomputes the ID.

Manifest object ``manifests/<snapshot id>``: b"STM1" | key id (16) | nonce (12) | AES-256-GCM(
manifest key, nonce, zstd(JSON), aad = the 32 header bytes + snapshot id).

The image is cut into blocks of ``block_size``; a chunk is a run of whole blocks inside one
aligned region of ``chunk_size`` (version 2; in version 1 every chunk is one block). A manifest
entry names bytes of the image and where they start inside a chunk, so an incremental backup
references the unchanged blocks of an older, larger chunk without reading them.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from driver import errors
from driver.backup.keys import KEY_ID_BYTES, RepositoryKey

CHUNK_MAGIC = b"STC1"
MANIFEST_MAGIC = b"STM1"
NONCE_BYTES = 12
CHUNK_AAD = b"stowage-chunk-v1:"
MANIFEST_FORMAT = "stowage-backup-manifest"
#: The manifest version this code writes. Readers accept every version in READABLE_VERSIONS.
MANIFEST_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
#: Chunks are runs of whole blocks within one aligned region of the chunk size: an incremental
#: backup reads and uploads changed blocks, a restore fetches objects of up to the chunk size
#: (fewer, larger GETs: docs/performance.md, "Backups").
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_BLOCK_SIZE = 1 << 20
ZSTD_LEVEL = 3
MAX_MANIFEST_BYTES = 256 << 20

_SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_CHUNK_ID = re.compile(r"^[0-9a-f]{64}$")
_local = threading.local()


def check_snapshot_id(snapshot_id: str) -> str:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise errors.InvalidArgument(
            f"backup snapshot ID {snapshot_id!r} must be 1-200 characters of A-Z a-z 0-9 . _ : - "
            "starting with a letter or digit"
        )
    return snapshot_id


def chunk_key_name(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_key_name(snapshot_id: str) -> str:
    return "manifests/" + check_snapshot_id(snapshot_id)


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.c = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.d = d
    return d


def chunk_id(key: RepositoryKey, data: bytes | memoryview) -> str:
    h = blake3.blake3(key=key.chunk_id_key, max_threads=1)
    h.update(data)
    return str(h.hexdigest())


def seal_chunk(key: RepositoryKey, cid: str, data: bytes | memoryview) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    body = _compressor().compress(data)
    ct = AESGCM(key.chunk_key).encrypt(nonce, body, CHUNK_AAD + cid.encode())
    return CHUNK_MAGIC + nonce + ct


def open_chunk(key: RepositoryKey, cid: str, blob: bytes, max_size: int) -> bytes:
    """The plaintext of a sealed chunk; DataLoss naming the chunk when anything is wrong."""
    if len(blob) < len(CHUNK_MAGIC) + NONCE_BYTES + 16 or not blob.startswith(CHUNK_MAGIC):
        raise errors.DataLoss(f"backup chunk {cid} is damaged: bad header")
    nonce = blob[4 : 4 + NONCE_BYTES]
    try:
        body = AESGCM(key.chunk_key).decrypt(
            nonce, blob[4 + NONCE_BYTES :], CHUNK_AAD + cid.encode()
        )
    except InvalidTag:
        raise errors.DataLoss(
            f"backup chunk {cid} is damaged: authentication failed (corrupted, swapped, or "
            "written with another key)"
        ) from None
    try:
        data: bytes = _decompressor().decompress(body, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise errors.DataLoss(f"backup chunk {cid} is damaged: {exc}") from None
    if chunk_id(key, data) != cid:
        raise errors.DataLoss(f"backup chunk {cid} is damaged: content does not match its ID")
    return data


@dataclass(frozen=True)
class ChunkRef:
    """Bytes [offset, offset + length) of the image: a hole (id None), or the bytes
    [skip, skip + length) of the stored chunk `id`."""

    offset: int
    length: int
    id: str | None
    skip: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def slice(self, offset: int, end: int) -> ChunkRef:
        """The part of this entry that covers image bytes [offset, end)."""
        assert self.offset <= offset < end <= self.end
        skip = self.skip + offset - self.offset if self.id is not None else 0
        return ChunkRef(offset, end - offset, self.id, skip)

    def joins(self, nxt: ChunkRef) -> bool:
        """True when `nxt` continues this entry: both holes, or the next bytes of one chunk."""
        return nxt.offset == self.end and nxt.id == self.id and (
            self.id is None or nxt.skip == self.skip + self.length
        )

    def to_json(self) -> list[Any]:
        if self.id is None or self.skip == 0:
            return [self.offset, self.length, self.id]
        return [self.offset, self.length, self.id, self.skip]


def holds(version: int, refs: Iterable[ChunkRef], length: int) -> bool:
    """True when a chunk of `length` bytes holds every slice these entries name (version 1:
    an entry is exactly its chunk)."""
    return all(c.skip + c.length <= length and (version >= 2 or c.length == length) for c in refs)


def merge_runs(entries: Iterable[ChunkRef]) -> list[ChunkRef]:
    """Adjacent entries that continue each other become one (runs of holes; consecutive slices
    of one chunk), so a sparse or incrementally built image has a small manifest."""
    out: list[ChunkRef] = []
    for e in entries:
        if out and out[-1].joins(e):
            prev = out[-1]
            out[-1] = ChunkRef(prev.offset, prev.length + e.length, prev.id, prev.skip)
        else:
            out.append(e)
    return out


@dataclass
class Manifest:
    snapshot_id: str
    source_volume_id: str
    name: str
    size: int
    filesystem: str
    sector_size: int
    created: str
    cluster_id: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    base_snapshot_id: str | None = None
    key_id: str = ""
    version: int = MANIFEST_VERSION
    chunks: list[ChunkRef] = field(default_factory=list)
    #: 0: the chunk size (version 1, where a chunk is one block).
    block_size: int = 0

    def __post_init__(self) -> None:
        if not self.block_size:
            self.block_size = min(self.chunk_size, DEFAULT_BLOCK_SIZE)
            if self.version == 1:
                self.block_size = self.chunk_size

    def chunk_ids(self) -> set[str]:
        return {c.id for c in self.chunks if c.id is not None}

    def by_chunk(self, skip_offsets: set[int] | None = None) -> dict[str, list[ChunkRef]]:
        """The stored entries grouped by chunk, in order of first use (entries at the given
        offsets left out)."""
        out: dict[str, list[ChunkRef]] = {}
        for c in self.chunks:
            if c.id is not None and not (skip_offsets and c.offset in skip_offsets):
                out.setdefault(c.id, []).append(c)
        return out

    def stored_bytes(self) -> int:
        return sum(c.length for c in self.chunks if c.id is not None)

    def to_json(self) -> dict[str, Any]:
        """The document in this manifest's own version (a version-1 manifest read back is
        written as it was stored)."""
        doc: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "key_id": self.key_id,
            "cluster_id": self.cluster_id,
            "snapshot_id": self.snapshot_id,
            "source_volume_id": self.source_volume_id,
            "name": self.name,
            "size": self.size,
            "filesystem": self.filesystem,
            "sector_size": self.sector_size,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "base_snapshot_id": self.base_snapshot_id,
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.version >= 2:
            doc["block_size"] = self.block_size
        return doc


def _bad(snapshot_id: str, what: str) -> errors.DataLoss:
    return errors.DataLoss(f"backup manifest {snapshot_id} is not valid: {what}")


def _int(doc: dict[str, Any], k: str, sid: str) -> int:
    v = doc.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(sid, f"{k} must be a non-negative integer")
    return v


def _str(doc: dict[str, Any], k: str, sid: str, optional: bool = False) -> str | None:
    v = doc.get(k)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _bad(sid, f"{k} must be a string")
    return v


def manifest_from_json(doc: Any, snapshot_id: str) -> Manifest:
    """Parse (and check) a manifest document of any readable version."""
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise _bad(snapshot_id, "not a Stowage backup manifest")
    version = doc.get("version")
    if not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise errors.FailedPrecondition(
            f"backup manifest {snapshot_id} has format version {version!r}; this Stowage reads "
            f"versions {sorted(READABLE_VERSIONS)}: upgrade Stowage to restore it"
        )
    if doc.get("snapshot_id") != snapshot_id:
        raise _bad(snapshot_id, "it names another snapshot (swapped object?)")
    size = _int(doc, "size", snapshot_id)
    chunk_size = _int(doc, "chunk_size", snapshot_id)
    block_size = chunk_size
    if version >= 2:
        block_size = _int(doc, "block_size", snapshot_id)
        if not block_size or block_size % 4096 or chunk_size % block_size:
            raise _bad(snapshot_id, "block_size must be a multiple of 4 KiB dividing chunk_size")
    raw = doc.get("chunks")
    if not isinstance(raw, list):
        raise _bad(snapshot_id, "chunks must be a list")
    chunks: list[ChunkRef] = []
    pos = 0
    for item in raw:
        # version 1: [offset, length, id|null]; version 2 adds an optional skip for stored ones
        if not (isinstance(item, list) and (len(item) == 3 or (version >= 2 and len(item) == 4))):
            raise _bad(snapshot_id, "every chunk entry is [offset, length, id|null(, skip)]")
        off, length, cid = item[:3]
        skip = item[3] if len(item) == 4 else 0
        if off != pos or not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise _bad(snapshot_id, f"chunk list not contiguous at offset {pos}")
        if cid is not None and (not isinstance(cid, str) or not _CHUNK_ID.fullmatch(cid)):
            raise _bad(snapshot_id, f"bad chunk id at offset {off}")
        if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0 or (
            cid is None and len(item) == 4
        ):
            raise _bad(snapshot_id, f"bad skip at offset {off}")
        if cid is not None and skip + length > chunk_size:
            raise _bad(snapshot_id, f"chunk at offset {off} is longer than chunk_size")
        chunks.append(ChunkRef(off, length, cid, skip))
        pos += length
    if pos != size:
        raise _bad(snapshot_id, f"chunks cover {pos} bytes, size is {size}")
    return Manifest(
        snapshot_id=snapshot_id,
        source_volume_id=_str(doc, "source_volume_id", snapshot_id) or "",
        name=_str(doc, "name", snapshot_id) or "",
        size=size,
        filesystem=_str(doc, "filesystem", snapshot_id) or "",
        sector_size=_int(doc, "sector_size", snapshot_id),
        created=_str(doc, "created", snapshot_id) or "",
        cluster_id=_str(doc, "cluster_id", snapshot_id) or "",
        chunk_size=chunk_size,
        base_snapshot_id=_str(doc, "base_snapshot_id", snapshot_id, optional=True),
        key_id=_str(doc, "key_id", snapshot_id) or "",
        version=version,
        chunks=chunks,
        block_size=block_size,
    )


def seal_document(key: RepositoryKey, snapshot_id: str, doc: dict[str, Any]) -> bytes:
    header = MANIFEST_MAGIC + bytes.fromhex(key.key_id)
    nonce = os.urandom(NONCE_BYTES)
    plain = _compressor().compress(json.dumps(doc, separators=(",", ":")).encode())
    ct = AESGCM(key.manifest_key).encrypt(nonce, plain, header + nonce + snapshot_id.encode())
    return header + nonce + ct


def seal_manifest(key: RepositoryKey, manifest: Manifest) -> bytes:
    manifest.key_id = key.key_id
    return seal_document(key, manifest.snapshot_id, manifest.to_json())


def manifest_key_id(blob: bytes) -> str | None:
    """The key ID in a sealed manifest's header (readable without the key), or None."""
    if len(blob) < 4 + KEY_ID_BYTES or not blob.startswith(MANIFEST_MAGIC):
        return None
    return blob[4 : 4 + KEY_ID_BYTES].hex()


def open_document(key: RepositoryKey, snapshot_id: str, blob: bytes) -> Any:
    kid = manifest_key_id(blob)
    if kid is None:
        raise _bad(snapshot_id, "bad header")
    if kid != key.key_id:
        raise errors.FailedPrecondition(
            f"backup {snapshot_id} was written with backup key ID {kid}, the configured key has "
            f"ID {key.key_id}: configure the key it was made with"
        )
    hlen = 4 + KEY_ID_BYTES
    nonce = blob[hlen : hlen + NONCE_BYTES]
    try:
        plain = AESGCM(key.manifest_key).decrypt(
            nonce, blob[hlen + NONCE_BYTES :], blob[: hlen + NONCE_BYTES] + snapshot_id.encode()
        )
        return json.loads(_decompressor().decompress(plain, max_output_size=MAX_MANIFEST_BYTES))
    except InvalidTag:
        raise _bad(snapshot_id, "authentication failed (corrupted or swapped)") from None
    except (zstandard.ZstdError, ValueError) as exc:
        raise _bad(snapshot_id, str(exc)) from None


def open_manifest(key: RepositoryKey, snapshot_id: str, blob: bytes) -> Manifest:
    m = manifest_from_json(open_document(key, snapshot_id, blob), snapshot_id)
    if m.key_id != key.key_id:
        raise _bad(snapshot_id, "key ID inside differs from its header")
    return m
