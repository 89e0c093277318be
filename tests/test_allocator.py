"""`moekit.train.allocator.keep_freed_memory`: large blocks come from the heap, not mmap."""
import subprocess
import sys

import pytest

from moekit.train.allocator import _libc

pytestmark = pytest.mark.skipif(_libc() is None, reason="needs Linux with glibc")

# mallinfo2 (glibc >= 2.33): hblkhd = bytes in mmapped blocks.
_PROBE = r"""
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from moekit.train.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()          # idempotent
before = libc.mallinfo2().hblkhd
x = torch.empty(64 << 20, dtype=torch.uint8); x.fill_(1)   # 64 MiB, above any mmap threshold
during = libc.mallinfo2().hblkhd
del x
y = torch.empty(64 << 20, dtype=torch.uint8)
print(during - before, libc.mallinfo2().arena >= (64 << 20))
"""


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        mmapped, heap_holds = out.stdout.split()
        return int(mmapped), heap_holds == "True"

    assert probe("default")[0] >= 64 << 20                  # glibc's default: a fresh mmap
    mmapped, heap_holds = probe("keep")
    assert mmapped == 0 and heap_holds                       # from the heap, which keeps it


def test_train_config_checks_keep_freed_memory():
    from moekit.train.config import TrainConfig
    assert TrainConfig().keep_freed_memory is True
    with pytest.raises(TypeError, match="keep_freed_memory"):
        TrainConfig(keep_freed_memory=1)
