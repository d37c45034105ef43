"""The process's memory figures on Linux: a field of /proc/self/status (VmRSS, VmHWM in kB),
and resetting the peak-RSS mark (VmHWM) to the current RSS through /proc/self/clear_refs.
None / False where /proc does not have them: the figure is then left out, not guessed.
"""
from __future__ import annotations


def status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False
