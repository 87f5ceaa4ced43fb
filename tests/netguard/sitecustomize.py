"""The test suite's network guard: no test may reach beyond this machine (ground rule 2, offline at run time).

conftest.py imports this module before anything else and puts its folder first on PYTHONPATH, so every Python process
a test starts (scripts, tools, `accelerate launch` ranks, wrapper scripts) imports it too, as its `sitecustomize`.
In every such process a name lookup or connection that leaves the machine is refused as an offline machine would
refuse it (libraries that try the Hub and fall back keep working) and is appended to the file named by
SD_TRAINER_TEST_NETLOG; conftest fails the test during which that file grew. Loopback, this host's own name and
Unix sockets stay allowed: distributed tests rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

LOG_ENV = "SD_TRAINER_TEST_NETLOG"
_LOCAL_NAMES = {"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname()}


def is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%", 1)[0]  # an IPv6 zone
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _record(what: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as log:  # one short append per attempt: whole lines across processes
            log.write(f"{what} (pid {os.getpid()})\n")


def install() -> None:
    if getattr(socket, "_sd_trainer_guarded", False):
        return
    real_getaddrinfo, real_gethostbyname = socket.getaddrinfo, socket.gethostbyname
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check_lookup(host) -> None:
        if not is_local(host):
            _record(f"name lookup of {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: refused by the test suite's network guard")

    def getaddrinfo(host, *args, **kwargs):
        check_lookup(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):
        check_lookup(host)
        return real_gethostbyname(host)

    def refused(sock, address) -> bool:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            _record(f"connection to {address!r}")
            return True
        return False

    def connect(self, address):
        if refused(self, address):
            raise OSError(errno.ENETUNREACH, f"{address}: refused by the test suite's network guard")
        return real_connect(self, address)

    def connect_ex(self, address):
        return errno.ENETUNREACH if refused(self, address) else real_connect_ex(self, address)

    socket.getaddrinfo, socket.gethostbyname = getaddrinfo, gethostbyname
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket._sd_trainer_guarded = True


if os.environ.get(LOG_ENV):
    install()
