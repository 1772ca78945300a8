"""Hand back the resident pages of memory-mapped weights once the kernels hold their own copy.

Bundles and prepared models are memory-mapped (`torch.load(mmap=True)`): a weight's pages count
in the process's resident set once read. The CPU kernels read weights in a packed copy
(models.kernels.pack), so after packing, the source pages are only read again for a few rows
(embedding lookups) or never. `madvise(MADV_DONTNEED)` drops them from this process; a later read
maps them again from the file, with the same bytes.

That last promise holds only for a private file mapping none of whose pages were ever written
through it (a written page is a private anonymous copy, and would revert to the file's bytes), so
only such mappings qualify: /proc/self/smaps counts those copies as "Anonymous" (its
"Private_Dirty" also counts page-cache pages of a file written moments ago, which are harmless:
the same page maps again). Anywhere else (anonymous memory, a written mapping, a system without
/proc) nothing is released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

from torch import Tensor

MADV_DONTNEED = 4  # Linux
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Span = tuple[int, int]  # [start, end) addresses


def clean_file_mappings(smaps: Path = Path("/proc/self/smaps")) -> list[Span]:
    """This process's private file mappings that no write has touched; [] where smaps is missing."""
    try:
        text = smaps.read_text()
    except OSError:
        return []
    spans: list[Span] = []
    current: list | None = None  # [start, end, private file mapping?, anonymous kB]

    def close() -> None:
        if current is not None and current[2] and current[3] == 0:
            spans.append((current[0], current[1]))

    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            close()
            start, end = (int(v, 16) for v in head[0].split("-"))
            path = head[5] if len(head) > 5 else ""
            current = [start, end, head[1].endswith("p") and path.startswith("/"), 0]
        elif current is not None and head and head[0] == "Anonymous:":
            current[3] += int(head[1])
    close()
    return spans


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _bounds(t: Tensor) -> Span:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def mapped(t: Tensor, spans: list[Span]) -> bool:
    """Whether `t` lies in one of `spans` (clean_file_mappings)."""
    start, end = _bounds(t)
    return t.device.type == "cpu" and any(lo <= start and end <= hi for lo, hi in spans)


def release(t: Tensor, spans: list[Span]) -> int:
    """Drop the whole pages under `t` if they lie in one of `spans` (clean_file_mappings); the
    bytes released (0 when none qualify). `t`'s values are unchanged: a read maps them again."""
    libc = _libc()
    if libc is None or not mapped(t, spans):
        return 0
    start, end = _bounds(t)
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE  # whole pages only: neighbours keep theirs
    if last <= first:
        return 0
    return last - first if libc.madvise(first, last - first, MADV_DONTNEED) == 0 else 0


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc; elsewhere nothing). Loading a model
    leaves its parsers' buffers freed but mapped (SmolLM2's tokenizer 16 MB, Gemma 3's 240 MB):
    before anything large is allocated, and once loading is done."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


__all__ = ["Span", "clean_file_mappings", "mapped", "release", "trim_heap"]
