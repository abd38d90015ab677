"""Free local TCP ports, for the test and benchmark servers started as processes."""

from __future__ import annotations

import random
import socket

# Ports nothing takes on its own: below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768 up), where Ray's many gRPC servers and every
# outgoing connection get theirs, and above Ray's worker ports (10002-19999). A port
# chosen here stays free until the server meant for it binds it, even when that is a
# replica binding seconds later while Ray starts dozens of processes.
QUIET_PORTS = range(20_000, 32_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(n: int) -> int:
    """A port p of QUIET_PORTS with p .. p+n-1 all free (Serve gives its direct-ingress
    replicas ports from such a range)."""
    pick = random.Random()
    for _ in range(200):
        base = pick.randrange(QUIET_PORTS.start, QUIET_PORTS.stop - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} free ports in a row")
