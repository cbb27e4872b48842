"""The C allocator's settings in a process that runs the engine for a case (the command line, the panel's engine
process, a cluster worker). glibc (Linux) only; elsewhere nothing changes.

glibc gives each allocation above a threshold (128 KiB, rising by itself to at most 32 MiB) its own pages from
the kernel and returns them when the allocation is freed, so the next array of that size faults in fresh zeroed
pages again. A case allocates and frees gigabytes of such arrays: PyTorch's activations, SimpleITK's images,
NumPy's temporaries. Measured on an abdomen case, about a million page faults. Served from the heap, with freed
memory kept for the next arrays, the same case has a tenth of them. What a case freed is returned after it, so an
idle engine process holds only what it still uses.

The engine itself (engine.segment) leaves the allocator alone: in Slicer's own process it is Slicer's.
"""

import ctypes
import functools
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_UP_TO_BYTES = 1 << 30  # arrays up to 1 GiB come from the heap (a case's largest is a few hundred MiB)
NEVER_TRIM_BYTES = (1 << 31) - 1  # mallopt takes an int: the heap is not shrunk while a case runs


@functools.lru_cache(maxsize=None)
def glibc():
    """This process's C library where it is glibc (it has gnu_get_libc_version), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        library = ctypes.CDLL(None)
    except OSError:
        return None
    wanted = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return library if all(hasattr(library, name) for name in wanted) else None


def keep_freed_memory():
    """Serve large arrays from the heap and keep what is freed for the next ones, until release_freed_memory.
    Returns whether the allocator took the settings."""
    library = glibc()
    if library is None:
        return False
    return bool(library.mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO_BYTES)
                and library.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES))


def release_freed_memory():
    """Return the memory freed so far to the system (the heap's unused pages)."""
    library = glibc()
    if library is not None:
        library.malloc_trim(0)
