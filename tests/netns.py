"""Pilot hosts of a test's own: network namespaces joined to this one by veth pairs, and a relay to RabbitMQ.

Each :class:`NetHost` is a namespace ``p3st-<random>`` with one veth pair:
one end stays in the root namespace, the other goes into the namespace, and
a /30 of 10.231.x.y addresses lives on these two ends only, so nothing else
on the machine routes to it.  RabbitMQ listens on 127.0.0.1, which a
namespace cannot reach, so a :class:`Relay` in the root namespace listens on
the root-side address and copies bytes to and from the broker.  Taking the
root-side end down (:meth:`NetHost.cut`) is what a worker node's unplugged
cable or a dead switch port looks like to the processes on both sides:
packets stop, no connection is closed, nobody is told.

Everything made here is removed by :meth:`NetHosts.close`, which a test calls
in a ``finally``: after a failure too, nothing is left behind.
"""

from __future__ import annotations

import random
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from tests.conftest import unavailable
from tests.procs import Part


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


class Relay:
    """A TCP relay in this process: ``listen`` (address, port 0 = any) to ``target``, one thread."""

    def __init__(self, listen: str, target: tuple[str, int]) -> None:
        self.target = target
        self._server = socket.create_server((listen, 0))
        self._server.setblocking(False)
        self.address = self._server.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{listen}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._server:
                    self._accept()
                elif sock in self._peers:
                    self._pump(sock)
        for sock in list(self._peers):
            sock.close()
        self._server.close()

    def _accept(self) -> None:
        try:
            client, _ = self._server.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            a.setblocking(False)
            self._peers[a] = b
            self._selector.register(a, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        other = self._peers[sock]
        try:
            data = sock.recv(65536)
            if data:
                # AMQP frames are small and the other side reads as fast as it
                # can; a short blocking send keeps this relay simple.
                other.settimeout(5)
                other.sendall(data)
                other.setblocking(False)
                return
        except OSError:
            pass
        for s in (sock, other):
            if s in self._peers:
                self._selector.unregister(s)
                del self._peers[s]
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class NetHost:
    """One namespace with its veth pair and addresses: a worker node as far as the network goes."""

    def __init__(self, name: str, outside: str, inside: str, outside_ip: str, inside_ip: str) -> None:
        self.name, self.outside, self.inside = name, outside, inside
        self.outside_ip, self.inside_ip = outside_ip, inside_ip
        self.relay: Relay | None = None

    def cut(self) -> None:
        """Take the link down: packets stop both ways; connections are not closed."""
        ip("link", "set", self.outside, "down")

    def heal(self) -> None:
        ip("link", "set", self.outside, "up")

    def broker_url(self, url: str) -> str:
        """``url`` (an amqp:// URL on 127.0.0.1) as this host reaches it, through its relay."""
        assert self.relay is not None
        host, port = self.relay.address
        rest = url.split("@", 1)[1].split("/", 1)[1]
        return f"{url.split('@', 1)[0]}@{host}:{port}/{rest}"


class NetHosts:
    """The namespaces of one test; ``close`` removes them all, with their veths and relays."""

    def __init__(self, broker: tuple[str, int]) -> None:
        self.broker = broker
        self.hosts: list[NetHost] = []
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = random.randrange(256)

    def add(self) -> NetHost:
        """A new namespace reachable from here on its own /30, with a relay to the broker."""
        n = len(self.hosts)
        assert n < 64
        name, outside, inside = f"p3st-{self.tag}-{n}", f"p3s{self.tag}o{n}", f"p3s{self.tag}i{n}"
        outside_ip, inside_ip = f"10.231.{self.subnet}.{4 * n + 1}", f"10.231.{self.subnet}.{4 * n + 2}"
        host = NetHost(name, outside, inside, outside_ip, inside_ip)
        done = ip("netns", "add", name, check=False)
        if done.returncode != 0:
            unavailable("network namespaces", f"`ip netns add` failed: {done.stderr.strip()}")
        self.hosts.append(host)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", name)
        ip("addr", "add", f"{outside_ip}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", name, "addr", "add", f"{inside_ip}/30", "dev", inside)
        ip("-n", name, "link", "set", inside, "up")
        ip("-n", name, "link", "set", "lo", "up")
        host.relay = Relay(outside_ip, self.broker)
        return host

    def close(self) -> None:
        for host in self.hosts:
            if host.relay is not None:
                host.relay.close()
            ip("link", "del", host.outside, check=False)  # its peer goes with it
            ip("netns", "del", host.name, check=False)
        self.hosts.clear()


def require_namespaces() -> None:
    """Skip (fail in CI) where this test cannot make namespaces: no ``ip``, or not allowed to."""
    if shutil.which("ip") is None:
        unavailable("network namespaces", "the `ip` command (iproute2) is not installed")
    probe = f"p3st-probe-{uuid.uuid4().hex[:6]}"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        unavailable("network namespaces", f"cannot create one here ({done.stderr.strip()}); it needs root")
    ip("netns", "del", probe, check=False)


class NetnsPart(Part):
    """A ``p3s`` daemon started inside a namespace (``ip netns exec`` execs it: the PID is the daemon's)."""

    def __init__(self, host: NetHost, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.args, self.log_path, self.host = name, args, log_path, host
        self._terminated = False
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, sys.executable, "-m", "p3s", *args], env=env,
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
