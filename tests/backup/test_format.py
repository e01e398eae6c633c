"""Format, keys, target specs and the pure extent-diff logic: no server, no root."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import blake3
import pytest

from driver import errors
from driver.backup import format as fmt
from driver.backup import parse_target, parse_targets
from driver.backup.extents import (
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
    Extent,
    Range,
    allocated_extents,
    diff_extents,
    merge,
)
from driver.backup.keys import RepositoryKey
from driver.backup.s3 import Credentials

KEY = RepositoryKey.from_bytes(bytes(range(32)))
OTHER = RepositoryKey.from_bytes(bytes(range(1, 33)))

# --- keys ----------------------------------------------------------------------------------


def test_key_file_formats(tmp_path: object) -> None:
    raw = bytes(range(32))
    for text in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode() + "\n"):
        assert RepositoryKey.parse(text).key_id == KEY.key_id
    assert KEY.key_id != OTHER.key_id
    assert len(KEY.key_id) == 32
    # Known answers, computed independently with RFC 5869 HKDF from hmac/hashlib (see
    # docs/backup-format.md): a third-party reader derives the same values.
    prk = hmac.new(b"\0" * 32, raw, hashlib.sha256).digest()
    okm = hmac.new(prk, b"stowage-backup/v1/key-id\x01", hashlib.sha256).digest()
    assert KEY.key_id == okm[:16].hex() == "aef209304bd08c0f4ce4de44f7597f1e"
    assert fmt.chunk_id(KEY, b"stowage") == blake3.blake3(
        b"stowage", key=hmac.new(prk, b"stowage-backup/v1/chunk-id\x01", hashlib.sha256).digest()
    ).hexdigest()
    assert len({KEY.chunk_id_key, KEY.chunk_key, KEY.manifest_key}) == 3
    assert raw.hex() not in repr(KEY)


@pytest.mark.parametrize("text", ["", "abc", "00" * 31, "00" * 33, "zz" * 32,
                                  base64.b64encode(b"x" * 31).decode(), "not base64 !!"])
def test_bad_key_files(text: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        RepositoryKey.parse(text, "key file K")
    if text.strip():
        assert text.strip() not in str(exc.value)


def test_key_load_missing(tmp_path: object) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        RepositoryKey.load(f"{tmp_path}/nope")


def test_credentials_from_env() -> None:
    with pytest.raises(errors.FailedPrecondition, match="AWS_ACCESS_KEY_ID"):
        Credentials.from_env({})
    c = Credentials.from_env({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "sekrit"})
    assert "sekrit" not in repr(c)


# --- chunks --------------------------------------------------------------------------------


def test_chunk_roundtrip_and_tamper() -> None:
    data = b"hello " * 5000
    cid = fmt.chunk_id(KEY, data)
    assert cid != fmt.chunk_id(OTHER, data)  # keyed: IDs depend on the key
    blob = fmt.seal_chunk(KEY, cid, data)
    assert data[:32] not in blob
    assert len(blob) < len(data)  # compressed
    assert fmt.open_chunk(KEY, cid, blob, 1 << 20) == data
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(errors.DataLoss, match=cid):
        fmt.open_chunk(KEY, cid, bytes(flipped), 1 << 20)
    other_id = fmt.chunk_id(KEY, b"other")
    with pytest.raises(errors.DataLoss, match="authentication"):
        fmt.open_chunk(KEY, other_id, blob, 1 << 20)  # swapped object
    with pytest.raises(errors.DataLoss):
        fmt.open_chunk(OTHER, cid, blob, 1 << 20)
    # sealed under an ID that is not its content's (a buggy or malicious writer with the key)
    liar = fmt.seal_chunk(KEY, other_id, data)
    with pytest.raises(errors.DataLoss, match="does not match its ID"):
        fmt.open_chunk(KEY, other_id, liar, 1 << 20)
    with pytest.raises(errors.DataLoss, match="header"):
        fmt.open_chunk(KEY, cid, b"XXXX" + blob[4:], 1 << 20)


# --- manifests -----------------------------------------------------------------------------


def _manifest() -> fmt.Manifest:
    cid = fmt.chunk_id(KEY, b"a")
    return fmt.Manifest(
        snapshot_id="s-1", source_volume_id="v-1", name="pvc", size=3 << 20, filesystem="xfs",
        sector_size=512, created="2026-12-02T00:00:00Z", cluster_id="c1", chunk_size=1 << 20,
        chunks=[fmt.ChunkRef(0, 1 << 20, cid), fmt.ChunkRef(1 << 20, 2 << 20, None)],
    )


def test_manifest_roundtrip_and_authentication() -> None:
    m = _manifest()
    blob = fmt.seal_manifest(KEY, m)
    assert fmt.manifest_key_id(blob) == KEY.key_id
    back = fmt.open_manifest(KEY, "s-1", blob)
    assert back.to_json() == m.to_json()
    with pytest.raises(errors.FailedPrecondition, match="key ID"):
        fmt.open_manifest(OTHER, "s-1", blob)
    with pytest.raises(errors.DataLoss, match="authentication"):
        fmt.open_manifest(KEY, "s-2", blob)  # renamed object
    bad = bytearray(blob)
    bad[-3] ^= 0x10
    with pytest.raises(errors.DataLoss):
        fmt.open_manifest(KEY, "s-1", bytes(bad))


#: A version-1 manifest document exactly as Stowage 0.1 writes it. Keep this literal when the
#: format moves on: newer readers must still read it.
V1_DOC = {
    "format": "stowage-backup-manifest", "version": 1,
    "key_id": KEY.key_id, "cluster_id": "c1", "snapshot_id": "s-old",
    "source_volume_id": "v-9", "name": "pvc-9", "size": 5 << 20, "filesystem": "ext4",
    "sector_size": 4096, "created": "2026-12-01T10:00:00Z", "chunk_size": 1 << 20,
    "base_snapshot_id": None,
    "chunks": [[0, 1 << 20, "ab" * 32], [1 << 20, 3 << 20, None], [4 << 20, 1 << 20, "cd" * 32]],
}


def test_older_manifest_version_still_reads() -> None:
    blob = fmt.seal_document(KEY, "s-old", json.loads(json.dumps(V1_DOC)))
    m = fmt.open_manifest(KEY, "s-old", blob)
    assert m.version == 1 and m.size == 5 << 20 and m.filesystem == "ext4"
    assert m.chunk_ids() == {"ab" * 32, "cd" * 32}
    assert m.stored_bytes() == 2 << 20


#: The same version-1 manifest as stored in a target by Stowage 0.1 (sealed: "STM1", key ID,
#: nonce, AES-256-GCM of the zstd frame), and a stored chunk ("STC1") of 170 bytes. Bytes,
#: never regenerated: a newer reader that cannot open them has broken every existing backup.
V1_SEALED_MANIFEST = bytes.fromhex(
    "53544d31aef209304bd08c0f4ce4de44f7597f1eb82f007c6eb9b2740e97610068033955b4fcfd3efc0020014b82"
    "bda0112d4e9c9e0bc1bf1d30a2922a3750132dfba4baaf1f3085a622552c00f598da4b93c0055a3d2afae2d68e60"
    "0dba03df5a9c6b63602df06bfca04fbba7e8a9fa8ba08f46aa156603246f020dec69da167540f2b393719803603a"
    "a76336be0a4b173d6678433adced69c2f531277885739ba78f8774702a52bddac29d9c11db06d9eb6b1c1caaabf5"
    "96981f5ee5a65f252be489e94d77872cdf529941fe8bff15af6f7c91549c0d6c17cd4803c5247b6d54f14df74d59"
    "2bd47975a7f78b26bdd98e04f50d04048ced9c0b900c1c3ab1db1c3ef6527f696cba5becae06910f746beb3561b6"
    "e587405cc9aa50883d25979bce68c328ba01ba1e67e1e2d8c6bcc734c4695173d77b29e2777a490dd46361af21b7"
    "e25b1628"
)
V1_CHUNK_ID = "dc3f0319fd9b29aeea20f1ec84ed3f74fe8ec646847d41513ba19659421e0cea"
V1_SEALED_CHUNK = bytes.fromhex(
    "5354433172cbc351849b628248cd64181af68782038bfc88d2eac83541d4db7febe346b53774021a368abbb491cc"
    "0669ea2c16a56a12c780fb3a83f2497fdc8975"
)


def test_stored_version_1_objects_still_open() -> None:
    assert fmt.manifest_key_id(V1_SEALED_MANIFEST) == KEY.key_id
    m = fmt.open_manifest(KEY, "s-old", V1_SEALED_MANIFEST)
    assert m.to_json() == V1_DOC and m.key_id == KEY.key_id
    assert fmt.chunk_id(KEY, b"stowage v1 chunk " * 10) == V1_CHUNK_ID
    assert fmt.open_chunk(KEY, V1_CHUNK_ID, V1_SEALED_CHUNK, 1 << 20) == b"stowage v1 chunk " * 10


def test_newer_manifest_version_refused_clearly() -> None:
    doc = dict(V1_DOC, version=fmt.MANIFEST_VERSION + 1)
    blob = fmt.seal_document(KEY, "s-old", doc)
    with pytest.raises(errors.FailedPrecondition, match="upgrade Stowage"):
        fmt.open_manifest(KEY, "s-old", blob)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(size=1),
    lambda d: d.update(chunks=[[0, 1 << 20, "ab" * 32]]),
    lambda d: d["chunks"].__setitem__(0, [1, 1 << 20, "ab" * 32]),
    lambda d: d["chunks"].__setitem__(0, [0, 1 << 20, "XYZ"]),
    lambda d: d.update(snapshot_id="s-other"),
    lambda d: d.update(format="zip"),
    lambda d: d.update(chunks="nope"),
])
def test_invalid_manifest_documents(mutate: object) -> None:
    doc = json.loads(json.dumps(V1_DOC))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(errors.DataLoss):
        fmt.manifest_from_json(doc, "s-old")


@pytest.mark.parametrize("sid", ["", "../x", "a/b", "-x", "x" * 201, "a b", "ü"])
def test_bad_snapshot_ids(sid: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        fmt.manifest_key_name(sid)


# --- target specs --------------------------------------------------------------------------


def test_target_spec_good() -> None:
    t = parse_target("prod=s3://my-bucket/a/b?endpoint=https://s3.example.com:9000&region=eu-1")
    assert (t.name, t.bucket, t.prefix, t.endpoint, t.region) == (
        "prod", "my-bucket", "a/b", "https://s3.example.com:9000", "eu-1")
    assert t.key("chunks/x") == "a/b/chunks/x"
    t2 = parse_target("x=s3://bkt?endpoint=http://127.0.0.1:9000")
    assert (t2.prefix, t2.region, t2.key("m")) == ("", "us-east-1", "m")
    assert parse_target("x=s3://bkt/p/?endpoint=http://[::1]:9000").prefix == "p"


@pytest.mark.parametrize("spec", [
    "", "noequals", "=s3://bkt?endpoint=http://h", "UPPER=s3://bkt?endpoint=http://h",
    "n=http://bkt?endpoint=http://h", "n=s3://bkt", "n=s3://bkt?", "n=s3://bk?endpoint=http://h",
    "n=s3://Bucket?endpoint=http://h", "n=s3://bkt//p?endpoint=http://h",
    "n=s3://bkt/../p?endpoint=http://h", "n=s3://bkt?endpoint=ftp://h",
    "n=s3://bkt?endpoint=http://", "n=s3://bkt?endpoint=http://h/path",
    "n=s3://bkt?endpoint=http://u:p@h", "n=s3://bkt?endpoint=http://h:99999",
    "n=s3://bkt?endpoint=http://h&region=EU", "n=s3://bkt?endpoint=http://h&foo=1",
    "n=s3://bkt?endpoint=http://h&endpoint=http://i", "n=s3://bkt?region=eu",
    "n=s3://bkt?endpoint=http://h:notaport", "n=s3://b..k?endpoint=http://h",
])
def test_target_spec_malformed(spec: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="the form is"):
        parse_target(spec)


def test_target_names_unique() -> None:
    a = "a=s3://bkt?endpoint=http://h"
    assert list(parse_targets([a, "b=s3://bkt?endpoint=http://h"])) == ["a", "b"]
    with pytest.raises(errors.InvalidArgument, match="twice"):
        parse_targets([a, a])


# --- extent diff logic (synthetic maps) -------------------------------------------------------

M = 1 << 20


def ext(lo: int, phys: int, n: int, flags: int = 0) -> Extent:
    return Extent(lo * M, phys * M, n * M, flags)


def test_merge() -> None:
    assert merge([Range(5, 5), Range(0, 5), Range(20, 1), Range(3, 1), Range(30, 0)]) == [
        Range(0, 10), Range(20, 1)]


def test_diff_identical_shared_maps_is_empty() -> None:
    a = [ext(0, 100, 4, FIEMAP_EXTENT_SHARED), ext(8, 200, 2, FIEMAP_EXTENT_SHARED)]
    assert diff_extents(a, 10 * M, a, 10 * M) == []


def test_diff_names_rewritten_ranges() -> None:
    base = [ext(0, 100, 8)]
    # a CoW write of [2, 3) and [5, 7): new physical blocks there, the rest still shared
    new = [ext(0, 100, 2), ext(2, 500, 1), ext(3, 103, 2), ext(5, 600, 2), ext(7, 107, 1)]
    assert diff_extents(base, 8 * M, new, 8 * M) == [Range(2 * M, M), Range(5 * M, 2 * M)]


def test_diff_holes_unwritten_and_sizes() -> None:
    base = [ext(0, 100, 2)]
    new = [ext(0, 100, 2), ext(4, 300, 1, FIEMAP_EXTENT_UNWRITTEN), ext(6, 400, 1)]
    # unwritten reads as zeros like a hole; the new data past the base's end is changed
    assert diff_extents(base, 4 * M, new, 8 * M) == [Range(6 * M, M)]
    # punched hole in the new file: changed (data -> zeros)
    assert diff_extents(base, 2 * M, [ext(0, 100, 1)], 2 * M) == [Range(M, M)]
    # a shrunk file: the cut tail was data, so it is changed
    assert diff_extents(base, 2 * M, [ext(0, 100, 1)], M) == [Range(M, M)]


def test_diff_opaque_extents_always_changed() -> None:
    for flag in (FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_DATA_INLINE):
        a = [ext(0, 100, 4, flag | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST)]
        assert diff_extents(a, 4 * M, a, 4 * M) == [Range(0, 4 * M)]


def test_diff_same_physical_other_offset_is_changed() -> None:
    base = [ext(0, 100, 2)]
    new = [ext(0, 101, 2)]  # same extent start region but shifted mapping
    assert diff_extents(base, 2 * M, new, 2 * M) == [Range(0, 2 * M)]


def test_allocated_extents_skips_unwritten_and_clips() -> None:
    e = [ext(0, 1, 2), ext(2, 3, 1), ext(4, 9, 1, FIEMAP_EXTENT_UNWRITTEN), ext(6, 20, 4)]
    assert allocated_extents(e, 7 * M) == [Range(0, 3 * M), Range(6 * M, M)]


# --- version 2: chunks of several blocks, entries that name part of a chunk ------------------


def _v2_doc() -> dict[str, object]:
    doc = json.loads(json.dumps(V1_DOC))
    doc.update(version=2, chunk_size=4 << 20, block_size=1 << 20, size=9 << 20, chunks=[
        [0, 1 << 20, "ab" * 32, 1 << 20], [1 << 20, 1 << 20, "ef" * 32],
        [2 << 20, 2 << 20, "ab" * 32, 2 << 20], [4 << 20, 1 << 20, None],
        [5 << 20, 4 << 20, "cd" * 32],
    ])
    return doc


def test_version_2_manifest_roundtrip() -> None:
    doc = _v2_doc()
    m = fmt.open_manifest(KEY, "s-old", fmt.seal_document(KEY, "s-old", doc))
    assert (m.version, m.chunk_size, m.block_size) == (2, 4 << 20, 1 << 20)
    assert [c.skip for c in m.chunks] == [1 << 20, 0, 2 << 20, 0, 0]
    assert m.chunk_ids() == {"ab" * 32, "cd" * 32, "ef" * 32}
    assert m.to_json() == doc
    assert fmt.ChunkRef(0, 4, "ab" * 32).slice(1, 3) == fmt.ChunkRef(1, 2, "ab" * 32, 1)
    assert fmt.merge_runs(m.chunks[2].slice(o, o + (1 << 20)) for o in (2 << 20, 3 << 20)) == [
        m.chunks[2]
    ]


def test_version_1_manifest_keeps_one_block_per_chunk() -> None:
    m = fmt.open_manifest(KEY, "s-old", V1_SEALED_MANIFEST)
    assert m.block_size == m.chunk_size == 1 << 20
    assert "block_size" not in m.to_json()


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("block_size"),
    lambda d: d.update(block_size=3 << 20),
    lambda d: d.update(block_size=1000),
    lambda d: d["chunks"].__setitem__(3, [4 << 20, 1 << 20, None, 0]),
    lambda d: d["chunks"].__setitem__(0, [0, 1 << 20, "ab" * 32, -1]),
    lambda d: d["chunks"].__setitem__(0, [0, 1 << 20, "ab" * 32, True]),
    lambda d: d["chunks"].__setitem__(0, [0, 1 << 20, "ab" * 32, 7 << 20]),
    lambda d: d["chunks"].__setitem__(4, [5 << 20, 4 << 20, "cd" * 32, 1]),
])
def test_invalid_version_2_documents(mutate: object) -> None:
    doc = _v2_doc()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(errors.DataLoss):
        fmt.manifest_from_json(doc, "s-old")


def test_version_1_entries_have_no_skip() -> None:
    doc = json.loads(json.dumps(V1_DOC))
    doc["chunks"][0] = [0, 1 << 20, "ab" * 32, 0]
    with pytest.raises(errors.DataLoss):
        fmt.manifest_from_json(doc, "s-old")


#: A version-2 manifest as stored by the first writer of version 2 (sealed bytes, never
#: regenerated), and its document. Later readers must keep opening it.
V2_DOC = {
    "format": "stowage-backup-manifest", "version": 2,
    "key_id": KEY.key_id, "cluster_id": "c1", "snapshot_id": "s-v2",
    "source_volume_id": "v-9", "name": "pvc-9", "size": 9 << 20, "filesystem": "ext4",
    "sector_size": 4096, "created": "2026-12-01T10:00:00Z", "chunk_size": 4 << 20,
    "block_size": 1 << 20, "base_snapshot_id": None,
    "chunks": [[0, 1 << 20, "ab" * 32, 1 << 20], [1 << 20, 1 << 20, "ef" * 32],
               [2 << 20, 2 << 20, "ab" * 32, 2 << 20], [4 << 20, 1 << 20, None],
               [5 << 20, 4 << 20, "cd" * 32]],
}
V2_SEALED_MANIFEST = bytes.fromhex(
    "53544d31aef209304bd08c0f4ce4de44f7597f1e81da3bbcf460603ab69b45a7ed7b59439f1787114a0de24250"
    "e0afe5019a0871e11bbf246f5f37e68e5f603dcedb51df37a70f5b3dda199a28236a8bb5cc58e5387d1ea3e7c1"
    "9b28d354a7ab64f36aa36d03c08ce79b04c323c003016a562cf594ca3a4d3410e35dbd54c079efda0a97212267"
    "ac3882c02b989424da2529688730e4a501a3eda10c4106a35693b2d75a58d950a7512dc140a191c0b0019b50e1"
    "73c32db1ba4bb3521fabc13effe4b83215d4443c6fd30d2e5c2e9727ef3fa9b8ccbda6995f7635e470dc777645"
    "6ee37a1df68f89279f44af6d49db33bb5aa72252ff1f83ef3d1453a63f4997a647ff431403a028de326074d2c1"
    "c74297abaa7c75b0cf466b13644a2f1dccc3cea7b181a78a972a8aea084e61bf41e5b68f44ea05e5b10071f36a"
    "72c8ddc3058c52eaae99259dba1f28aff35cf33d2ee646c9c83365c752e5b9b33ce2def9dd28bfcc1adc266a16"
    "928faab309a221"
)


def test_stored_version_2_manifest_still_opens() -> None:
    m = fmt.open_manifest(KEY, "s-v2", V2_SEALED_MANIFEST)
    assert m.to_json() == V2_DOC
    assert [c.skip for c in m.chunks] == [1 << 20, 0, 2 << 20, 0, 0]
