"""How much memory this machine has free, torch-free (detect-noise sizes its work with it)."""

from __future__ import annotations

import os


def available_memory() -> int:
    """Bytes of memory available to new allocations: Linux's ``MemAvailable`` (free memory plus
    what the page cache can give back), else the free pages the OS reports."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 1 << 62  # unknown: nothing is refused for want of memory
