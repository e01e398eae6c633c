"""Test images: sparse files with random and compressible data at chosen chunk indexes."""

from __future__ import annotations

import hashlib
import os
import random


def write_image(path: str, size: int, chunk: int, data_chunks: dict[int, bytes]) -> None:
    """A sparse file of `size` bytes; chunk i holds data_chunks[i], the rest is holes."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i, data in data_chunks.items():
            fh.seek(i * chunk)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def rand_chunks(rng: random.Random, indexes: list[int], chunk: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for n, i in enumerate(indexes):
        if n % 3 == 0:  # compressible
            out[i] = (f"chunk {i} ".encode() * (chunk // 8 + 1))[:chunk]
        else:
            out[i] = rng.randbytes(chunk)
    return out


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def allocated_bytes(path: str) -> int:
    """Bytes of `path` that are not holes, found with SEEK_DATA / SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = total = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
        return total
    finally:
        os.close(fd)
