"""Peak resident memory of this process.

``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is wrong for this on Linux: the kernel keeps it
across ``fork`` + ``exec``, so a child started by a big parent (a pytest or bench process with
torch loaded, a raylet) reports the parent's peak as its own. ``VmHWM`` in /proc/self/status is
the high-water mark of this process's own address space, reset at exec.
"""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
