"""Keeping the pages of memory-mapped Arrow data out of the process's resident memory once they have been read.

Reading a row of a memory-mapped file maps it, and the kernel maps up to 64 KiB of neighbouring pages with it
(fault-around), so random reads over a multi-GB file leave hundreds of MiB of file pages counted in the process's RSS
that it will not read again. ``release`` unmaps them (``madvise(MADV_DONTNEED)``): they stay in the page cache and are
mapped again when read, so RSS counts what the process holds, as if the rows had been read with ``pread``. Arrow maps
its files read-only, so nothing is lost. Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys

MADV_DONTNEED = 4  # Linux's value


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


_MADVISE = _madvise()


def mappings(paths: set[str]) -> list[tuple[int, int]]:
    """The (start, end) addresses at which this process maps any of ``paths`` (real paths)."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end))
    return found


def cache_files(*datasets) -> set[str]:
    """The real paths of the datasets' Arrow cache files (``datasets.Dataset`` or alike)."""
    return {os.path.realpath(f["filename"]) for ds in datasets for f in ds.cache_files}


def release_files(paths: set[str]) -> None:
    """Unmap the pages of the files ``paths`` that this process has read."""
    if _MADVISE is None or not paths:
        return
    for start, end in mappings(paths):
        _MADVISE(start, end - start, MADV_DONTNEED)


def release(*datasets) -> None:
    """Unmap the pages of the datasets' Arrow cache files that this process has read."""
    release_files(cache_files(*datasets))
