"""Free loopback ports for servers that tests, load tests and benchmarks start.

A port is taken from ``VGGSERVE_PORTS`` (``first-last``, default 20000-29999: below Linux's
ephemeral range, so no outgoing connection takes one between the pick and the server's bind),
must be bindable now, and is reserved with a lock file under the temporary folder for as long as
this process lives. Several suites on one machine therefore never pick the same port, and a port
is never handed out twice in one process (a server restarted on its own ports keeps them).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import threading
from pathlib import Path

DEFAULT_RANGE = "20000-29999"
LOCK_FOLDER = Path(tempfile.gettempdir()) / "vggserve-ports"

_reserved: dict[int, int] = {}  # port -> descriptor of its lock file, held until exit
_lock = threading.Lock()


def port_range() -> range:
    """The ports handed out: ``VGGSERVE_PORTS=first-last`` (default 20000-29999)."""
    text = os.environ.get("VGGSERVE_PORTS", DEFAULT_RANGE)
    first, _, last = text.partition("-")
    try:
        ports = range(int(first), int(last) + 1)
    except ValueError:
        ports = range(0)
    if not ports or ports.start < 1024 or ports.stop > 65536:
        raise ValueError(
            f"VGGSERVE_PORTS={text!r}: expected two port numbers between 1024 and 65535, "
            f"first <= last, e.g. {DEFAULT_RANGE}"
        )
    return ports


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (with SO_REUSEADDR, as servers set it,
    so a port whose last connection is in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _reserve(port: int) -> bool:
    """Take ``port``'s lock file (for the life of this process) if no other process holds it."""
    LOCK_FOLDER.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(LOCK_FOLDER / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False
    if not bindable(port):
        os.close(descriptor)  # closing releases the lock
        return False
    _reserved[port] = descriptor
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports, never handed out before in this process."""
    ports = port_range()
    found: list[int] = []
    with _lock:
        start = random.randrange(len(ports))
        for offset in range(len(ports)):
            port = ports[(start + offset) % len(ports)]
            if port not in _reserved and _reserve(port):
                found.append(port)
                if len(found) == count:
                    return found
    raise RuntimeError(
        f"fewer than {count} free ports in {ports.start}-{ports.stop - 1}; stop other servers "
        "or choose another range with VGGSERVE_PORTS=first-last"
    )


def free_port() -> int:
    """One free loopback port (see :func:`free_ports`)."""
    return free_ports(1)[0]
