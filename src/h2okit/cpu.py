"""The CPU this runs on, as Linux's /proc/cpuinfo describes it (elsewhere: what `platform` knows)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The first processor's fields (model name, flags, ...); empty where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # every processor repeats the first one's description
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The instruction-set flags (x86 `flags`, ARM `Features`)."""
    info = cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())
