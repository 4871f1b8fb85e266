"""Keep the process heap from ratcheting up with every new image size.

Each image size gives buffers of a new size (decoded pixels, rescaled views, ONNX Runtime
activations). glibc raises its mmap threshold after such buffers are freed, so later ones come
from the heap, which fragments and is rarely returned: RSS climbs over hundreds of requests
(+16% after 500 mixed-size requests, measured with bench/memory.py). A fixed threshold keeps
large buffers in mmap, returned to the system when freed.

The trim threshold is left alone: lowering it to 1 MiB too returned the heap's top after every
inference and cost ~12% of full VGG-16's latency in page faults (4.49 vs 3.94 s median, five
requests each), for no measurable gain in RSS (+3.8% over 300 requests without it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1 << 20  # 1 MiB: a 640x480 RGB image is ~0.9 MB

log = logging.getLogger("server")


def fix_mmap_threshold(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Fix glibc's mmap threshold; False (and nothing done) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt refused the mmap threshold; RSS may grow with image sizes")
    return ok
