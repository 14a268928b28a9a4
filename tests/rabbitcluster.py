"""A RabbitMQ cluster of a test's own: three nodes on 127.0.0.1, stopped by PID.

Each node has its own name (``p3stestN_<tag>@localhost``), AMQP port,
distribution port, data, log and config directories under the test's tmp
dir, and the cluster its own Erlang cookie (``$HOME/.erlang.cookie`` of a
home directory made for it: the server and ``rabbitmqctl`` both read it from
there).  The nodes register their distribution ports with the machine's epmd
(port 4369), which only maps names to ports and keeps no other state: the
names are unique, so they never meet the system's ``rabbit@localhost``,
which this module never talks to.  No plugin is enabled (no management).

Nodes are started in parallel, then nodes 2 and 3 join node 1 with
``rabbitmqctl -n NODE stop_app / join_cluster / start_app``.  A node is
killed with SIGKILL by the PID of its Erlang VM (from the pid file the node
writes) and of the shell that started it, never by a name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

SBIN = Path("/usr/lib/rabbitmq/bin")


class ClusterError(RuntimeError):
    """The cluster could not be started or asked."""


def _tool(name: str) -> str:
    # The /usr/sbin wrappers switch to the rabbitmq user and its home (and so
    # its cookie); the scripts behind them run as whoever calls them.
    path = SBIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed")
    return found


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Node:
    """One node of the cluster: its name, ports, directories and processes."""

    def __init__(self, base: Path, index: int, tag: str, home: Path) -> None:
        self.index = index
        self.short = f"p3stest{index}_{tag}"
        self.name = f"{self.short}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = base / f"node{index}"
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.beam_pid = 0
        for sub in ("data", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.file.level = info\n"
            "log.console = false\n"
            # A lost node must be noticed in seconds, not the default minute.
            "net_ticktime = 4\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "data"),
            RABBITMQ_MNESIA_DIR=str(self.dir / "data" / self.name),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "beam.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def start(self) -> None:
        with open(self.dir / "stdout.log", "ab") as out:
            # A session of its own: its process group holds the script, the VM and the
            # VM's helpers, so a node that never finished booting is killed whole too.
            self.proc = subprocess.Popen([_tool("rabbitmq-server")], env=self.env(), cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n THIS_NODE args``, with this cluster's cookie."""
        done = subprocess.run([_tool("rabbitmqctl"), "-n", self.name, *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {self.name} {' '.join(args)} exited {done.returncode}: "
                               f"{done.stderr.strip()[-2000:]}\n{self.log_tail()}")
        return done

    def wait_booted(self, timeout: float) -> None:
        self.ctl("wait", "--timeout", str(int(timeout)), str(self.dir / "beam.pid"), timeout=timeout + 10)
        self.beam_pid = int((self.dir / "beam.pid").read_text().strip())

    def restart(self) -> None:
        """Start a killed node again on its own data: it rejoins the cluster it was in."""
        (self.dir / "beam.pid").unlink(missing_ok=True)
        self.beam_pid = 0
        self.start()

    def alive(self) -> bool:
        return bool(self.beam_pid) and pid_alive(self.beam_pid)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM by its PID, then the process group of the script that started it."""
        if self.beam_pid:
            try:
                os.kill(self.beam_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        end = time.monotonic() + 10
        while self.beam_pid and pid_alive(self.beam_pid) and time.monotonic() < end:
            time.sleep(0.05)

    def log_tail(self, size: int = 3000) -> str:
        texts = []
        for path in sorted(self.dir.glob("log/*.log")) + [self.dir / "stdout.log"]:
            if path.exists():
                texts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-size:]}")
        return "\n".join(texts)


class Cluster:
    """Three (or ``size``) clustered nodes; see the module docstring."""

    def __init__(self, base: Path, size: int = 3) -> None:
        tag = uuid.uuid4().hex[:6]
        self.base = base
        home = base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        self.nodes = [Node(base, i + 1, tag, home) for i in range(size)]
        self.version = ""  # RabbitMQ's, once started

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node_named(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node {name} in this cluster")

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.wait_booted(timeout), self.nodes))
        first = self.nodes[0]

        def join(node: Node) -> None:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")

        # One at a time: two nodes joining at once may both read the old membership.
        for node in self.nodes[1:]:
            join(node)
        answer = first.ctl("eval", "{length(rabbit_nodes:all_running()), rabbit_misc:version()}.").stdout.strip()
        running, _, version = answer.strip("{}").partition(",")
        if running != str(len(self.nodes)):
            raise ClusterError(f"{running} of {len(self.nodes)} nodes running after the joins")
        self.version = version.strip('"')

    def live(self) -> Node:
        for node in self.nodes:
            if node.alive():
                return node
        raise ClusterError("no node of the cluster is alive")

    def queues(self, vhost: str = "/") -> dict[str, tuple[str, int | None]]:
        """Every queue of ``vhost``: the node that holds it (see :meth:`queue_leader`) and its messages.

        The messages are None where the node cannot count them (its queue's node is down).
        """
        out = self.live().ctl("list_queues", "-p", vhost, "name", "type", "leader", "pid", "messages",
                              "--no-table-headers", "--quiet").stdout
        found: dict[str, tuple[str, int | None]] = {}
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) < 5:
                continue
            name, kind, leader, pid, messages = fields[:5]
            # A quorum queue has a leader; a classic queue's pid is <rabbit@host.N.M.K>: the node it lives on.
            node = leader if kind == "quorum" else pid.strip("<>").rsplit(".", 3)[0]
            found[name] = (node, int(messages) if messages.isdigit() else None)
        return found

    def queue_leader(self, queue: str, vhost: str = "/") -> str:
        """The node that holds a queue: a quorum queue's leader, a classic queue's home."""
        found = self.queues(vhost)
        if queue not in found:
            raise ClusterError(f"queue {queue} not found in vhost {vhost}: {sorted(found)}")
        return found[queue][0]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def describe(self) -> str:
        """Each node's log tail, and the queues as a live node sees them."""
        texts = [f"=== {n.name} (port {n.port}, {'alive' if n.alive() else 'down'})\n{n.log_tail()}" for n in self.nodes]
        try:
            texts.append(self.live().ctl("list_queues", "name", "type", "durable", "leader", "online", "messages",
                                         "consumers", "state", timeout=30, check=False).stdout)
        except (ClusterError, OSError, subprocess.TimeoutExpired) as exc:
            texts.append(f"queues unknown: {exc}")
        return "\n".join(texts)


@contextmanager
def cluster(base: Path, size: int = 3, timeout: float = 60.0) -> Iterator[Cluster]:
    """A started cluster, killed by PID afterwards (on failure to start too)."""
    c = Cluster(base, size)
    try:
        c.start(timeout)
        yield c
    finally:
        c.stop()
