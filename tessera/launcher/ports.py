"""Loopback port selection and checks."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable

LOOPBACK = "127.0.0.1"


class PortInUse(RuntimeError):
    """A port a component needs is already bound by something else."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(f"port {port} for {name} is already in use")
        self.name = name
        self.port = port


def is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``host:port`` can be bound for listening right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Match the servers, which all set SO_REUSEADDR: a listener makes the port busy,
        # connections lingering in TIME_WAIT do not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def ensure_free(name: str, port: int) -> None:
    """Raise :class:`PortInUse` if ``port`` on loopback is taken."""
    if not is_free(port):
        raise PortInUse(name, port)


def free_port(*, exclude: Iterable[int] = (), pair: bool = False) -> int:
    """A free loopback port chosen by the kernel, not in ``exclude``.

    With ``pair=True`` the next port up is free too (OpenBao dev mode binds its cluster
    listener on ``port + 1``). The port is released before returning, so a racing process
    could take it; callers bind promptly.
    """
    taken = set(exclude)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port in taken or (pair and (port + 1 in taken or port + 1 > 65535)):
            continue
        if pair and not is_free(port + 1):
            continue
        return port
    raise RuntimeError("no free loopback port found")


def preferred_port(preferred: int, *, exclude: Iterable[int] = (), pair: bool = False) -> int:
    """``preferred`` when it (and ``preferred + 1`` with ``pair``) is free, else any free port."""
    taken = set(exclude)
    candidates = (preferred, preferred + 1) if pair else (preferred,)
    if all(p not in taken and is_free(p) for p in candidates):
        return preferred
    return free_port(exclude=taken, pair=pair)
