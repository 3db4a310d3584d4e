"""The C allocator of a run's process: glibc malloc settings for torch's CPU tensors.

:func:`tune` (called by :func:`hpcflow.parallel.make_world`, so by every driver, and by
the bench) applies :data:`MALLOC_SETTINGS` once per process.  MPI-free, so that the bench,
which starts mpirun itself, can call it without initialising MPI.
"""

from __future__ import annotations

import os

#: glibc malloc settings of a run (``mallopt``; glibc's <malloc.h> numbers): blocks up to
#: 1 GiB from the heap instead of fresh ``mmap`` pages, and freed memory kept for the next
#: allocation instead of returned to the kernel.  Torch's CPU allocator takes every tensor
#: from malloc, and an HMC step allocates the same blocks every trajectory (its momenta, its
#: chunks' outputs and the graphs' buffers); with glibc's defaults the blocks above its
#: dynamic threshold come back as fresh pages, which the kernel zeroes on first touch.
#: Measured by the bench (``allocator`` and ``allocator_default`` in results/bench-cpu.json).
#: The price: a process keeps its peak heap until it exits (a production's shapes do not
#: change, so its peak is its steady state).
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 2 ** 31 - 1), "M_MMAP_THRESHOLD": (-3, 2 ** 30)}

#: Environment variables that leave the allocator as it is: the user's own glibc tunables,
#: or ``HPCFLOW_MALLOC=default``.
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_state: dict | None = None


def tune() -> dict:
    """Apply :data:`MALLOC_SETTINGS` once per process, where the C library is glibc and
    neither the environment (:data:`MALLOC_ENV`, ``HPCFLOW_MALLOC=default``) nor an
    ``LD_PRELOAD``-ed allocator (jemalloc, tcmalloc, mimalloc) says otherwise.  Returns what
    was done: ``{"applied": {name: value}}`` or ``{"skipped": reason}``."""
    global _state
    if _state is not None:
        return _state
    import ctypes
    import ctypes.util

    preload = os.environ.get("LD_PRELOAD", "")
    set_by = [v for v in MALLOC_ENV if v in os.environ]
    if os.environ.get("HPCFLOW_MALLOC", "") == "default":
        _state = {"skipped": "HPCFLOW_MALLOC=default"}
    elif set_by:
        _state = {"skipped": f"{set_by[0]} is set"}
    elif any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")):
        _state = {"skipped": f"LD_PRELOAD={preload}"}
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            version = libc.gnu_get_libc_version().decode()
        except (OSError, AttributeError):
            _state = {"skipped": "not glibc"}
        else:
            applied = {}
            for name, (number, value) in MALLOC_SETTINGS.items():
                if libc.mallopt(number, value) == 1:
                    applied[name] = value
            _state = {"applied": applied, "glibc": version}
    return _state
