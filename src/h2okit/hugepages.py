"""Transparent huge pages (2 MB) for the big buffers a decode step streams.

Decode reads every weight once per step, at memory bandwidth. In 4 KB pages that is a TLB miss every
4 KB and a hardware prefetcher that stops at each page's end; in 2 MB pages neither happens. On the
development machine (Sapphire Rapids, THP in `madvise` mode) the fp32 fast path decoded 1.15x faster at
batch 1 and 1.10x at batch 8 with its weights in huge pages (one interleaved run, P=512; docs/measurements.md,
seventh session).

Linux gives huge pages to an anonymous *private* mapping that asks for them (MADV_HUGEPAGE) wherever an
aligned 2 MB range of it is touched; torch's allocator never asks. So the buffers here are mmap'd
(MAP_PRIVATE, an extra 2 MB to align the start), advised, and handed to torch with `torch.frombuffer`,
which keeps the mapping alive as long as a tensor uses it. Where the platform has no MADV_HUGEPAGE the
buffers are ordinary torch memory, and `huge_bytes` reports 0: what a buffer got is measured, not assumed.
`H2OKIT_HUGE_PAGES=0` in the environment turns them off (to compare, or where THP's memory use is unwelcome).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from .config import ConfigError

HUGE_PAGE = 2 << 20
ALIGN = 4096  # each packed tensor starts on its own 4 KB page


def available() -> bool:
    """Can buffers ask for huge pages: the platform allows it and H2OKIT_HUGE_PAGES is not 0."""
    value = os.environ.get("H2OKIT_HUGE_PAGES", "1")
    if value not in ("0", "1"):
        raise ConfigError(f"H2OKIT_HUGE_PAGES={value!r} is not allowed; allowed: 0 (off) or 1 (on, the default)")
    return value == "1" and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def whole_pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole huge pages."""
    return -(-nbytes // HUGE_PAGE) * HUGE_PAGE


def empty_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes`, starting on a 2 MB boundary of a mapping advised to use
    huge pages (ordinary torch memory where huge pages cannot be asked for)."""
    if not available() or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (same dtypes and shapes, contiguous) laid out one after another in one
    huge-page buffer, each on its own 4 KB page: one mapping instead of one per tensor."""
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    arena = empty_bytes(sum(sizes))
    copies, offset = [], 0
    for tensor, size in zip(tensors, sizes):
        nbytes = tensor.numel() * tensor.element_size()
        copy = arena[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        copies.append(copy)
        offset += size
    return copies


def huge_bytes(tensors: list[torch.Tensor], smaps: Path = Path("/proc/self/smaps")) -> int:
    """How many bytes of the mappings holding `tensors` the kernel has backed with huge pages
    (AnonHugePages in /proc/self/smaps; 0 where that cannot be read)."""
    try:
        text = smaps.read_text()
    except OSError:
        return 0
    addresses = [t.data_ptr() for t in tensors if t.numel()]
    total, counted, inside = 0, set(), False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
            start, end = (int(part, 16) for part in head.split("-"))
            inside = any(start <= a < end for a in addresses) and start not in counted
            if inside:
                counted.add(start)
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
