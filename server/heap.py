"""Keep the process heap from ratcheting up with every new image size.

Each image size gives buffers of a new size (decoded pixels, rescaled views, ONNX Runtime
activations). glibc raises its mmap threshold after such buffers are freed, so later ones come
from the heap, which fragments and is rarely returned: RSS climbs over hundreds of requests
(+16% after 500 mixed-size requests, measured with bench/memory.py). A fixed threshold keeps
large buffers in mmap, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1 << 20  # 1 MiB: a 640x480 RGB image is ~0.9 MB

log = logging.getLogger("server")


def fix_mmap_threshold(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds; False (and nothing done) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt refused the heap thresholds; RSS may grow with image sizes")
    return ok
