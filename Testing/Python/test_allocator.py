"""The allocator settings of a process that runs cases (MSDSegmentLib.allocator), measured in fresh interpreters:
page faults of a large array allocated again, and the memory returned after a case."""

import json
import os
import subprocess
import sys

import pytest

from MSDSegmentLib import allocator

pytestmark = pytest.mark.skipif(allocator.glibc() is None, reason="the allocator settings apply to glibc (Linux)")

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "MSDSegment")

PROBE = """
import ctypes, json, resource, sys
sys.path.insert(0, {library!r})
from MSDSegmentLib import allocator

def resident_bytes():
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize()

took = allocator.keep_freed_memory() if {keep} else False
libc = allocator.glibc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(2):  # the first buffer may grow the heap; the second meets what a later array of a case meets
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(64 << 20)  # through malloc as PyTorch and ITK allocate (NumPy may ask for huge pages)
    ctypes.memset(buffer, 1, 64 << 20)
    libc.free(buffer)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = resident_bytes()
allocator.release_freed_memory()
print(json.dumps({{"took": took, "faults": faults, "held": held, "released": held - resident_bytes()}}))
"""


def probe(keep):
    done = subprocess.run([sys.executable, "-c", PROBE.format(library=LIBRARY, keep=keep)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_large_array_allocated_again_reuses_the_heap_and_the_memory_is_returned_after():
    default, kept = probe(keep=False), probe(keep=True)
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert kept["took"] and not default["took"]
    assert default["faults"] > pages // 2  # by default each 64 MiB array faults in its pages afresh
    assert kept["faults"] < default["faults"] // 10  # kept: the freed pages serve the next array
    assert kept["released"] > (32 << 20)  # and release_freed_memory gives them back
