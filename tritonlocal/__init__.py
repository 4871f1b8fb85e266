"""The real ``tritonserver`` from ``nvidia-pytriton``, run locally on CPU over a repository's twin.

``python -m tritonlocal`` (``make triton``) serves a model repository in the foreground; tests
use :class:`LocalTriton` directly.
"""

from tritonlocal.install import ServerInstall, TritonNotInstalled, prepare
from tritonlocal.launcher import LocalTriton, TritonStartError, port_is_free
from tritonlocal.twin import twin_config, write_twin

__all__ = [
    "LocalTriton",
    "ServerInstall",
    "TritonNotInstalled",
    "TritonStartError",
    "port_is_free",
    "prepare",
    "twin_config",
    "write_twin",
]
