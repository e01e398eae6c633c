"""The allocator thresholds the backup data path sets (driver/host/memory.py): freed multi-MiB
buffers are reused instead of being mapped, faulted in and zeroed again for every chunk."""

from __future__ import annotations

import subprocess
import sys

from harness import REPO

PROBE = """
import resource, sys
if sys.argv[1] == "tuned":
    from driver.host import memory
    assert memory.keep_large_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def burst():  # what one restore worker holds for a 4 MiB chunk, then frees
    bufs = [bytearray(4 << 20) for _ in range(5)]
    del bufs
burst(); burst()
before = faults()
for _ in range(20):
    burst()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout)


def test_large_buffers_are_reused_not_faulted_in_again() -> None:
    plain, tuned = _faults("plain"), _faults("tuned")
    # 20 bursts of 20 MiB: about 100,000 page faults with glibc's defaults, none once tuned.
    assert tuned < 1000
    assert plain > 10 * (tuned + 1000)
