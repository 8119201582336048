"""Process memory on Linux: resident set size, its high-water mark, and how to reset it."""

from __future__ import annotations


def rss_mb(field: str = "VmRSS") -> float | None:
    """A memory field of /proc/self/status in MiB (``VmRSS`` now, ``VmHWM`` the peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """Return freed heap memory to the OS, so the next high-water mark measures new use."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
