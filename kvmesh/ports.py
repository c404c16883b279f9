"""Checks a process makes before it starts serving, so a taken port is one line, not a traceback."""

from __future__ import annotations

import errno
import socket


def port_taken(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound because something already listens there."""
    if not port:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def taken_ports_error(host: str, ports: dict[str, int | None]) -> str | None:
    """One message naming every flag whose port is already in use, or None."""
    taken = [f"{flag} {port}" for flag, port in ports.items() if port and port_taken(host, port)]
    if not taken:
        return None
    return f"port already in use on {host}: {', '.join(taken)} (another kvmesh process?); choose another"
