"""A real Redis Cluster on loopback, for the tests that need one.

Three masters by default, optionally with replicas, joined by ``redis-cli --cluster create``;
helpers to reshard slots, fail over, and kill and restart single nodes, all done with the
real ``redis-cli`` and ``redis-server``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from demo import procs

#: A node's cluster bus listens on its port + 10000, so the node's port must stay below this.
MAX_PORT = 55535
#: The lowest port a node may get.
MIN_PORT = 20000
#: Every node's ``cluster-node-timeout``: a master unreachable this long is failed over.
NODE_TIMEOUT_MS = 2000

#: How long a replica waits for its master in a manual failover (Redis's CLUSTER_MF_TIMEOUT).
MANUAL_FAILOVER_TIMEOUT = 5.0

#: Flags in ``CLUSTER NODES`` that say a node is not (yet) a healthy member.
_UNHEALTHY = frozenset({"fail", "fail?", "handshake", "noaddr"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class NodeEntry:
    """One line of ``CLUSTER NODES``: a node as the node asked sees it."""

    id: str
    port: int
    flags: frozenset[str]
    #: The id of the master it replicates, or None for a master.
    master_id: str | None
    #: ``connected`` or ``disconnected``: the state of the cluster bus link to it.
    link: str
    #: The slots it serves (ranges being imported or migrated not included).
    slots: frozenset[int]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def myself(self) -> bool:
        return "myself" in self.flags

    @property
    def healthy(self) -> bool:
        return not self.flags & _UNHEALTHY


class ClusterNodes:
    """``masters`` redis-server nodes in cluster mode, each with ``replicas`` replicas.

    The first ``masters`` ports start as the masters; ``redis-cli --cluster create`` decides
    which replica follows which master. Roles change on a failover, so ask
    :meth:`master_ports` and :meth:`replica_ports` rather than assuming them.
    """

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        #: Every node's port, masters first as created.
        self.ports = _free_ports(masters * (1 + replicas))
        self.nodes = [self._node(port) for port in self.ports]
        self._by_port = dict(zip(self.ports, self.nodes, strict=True))
        self._ids: dict[int, str] = {}
        self._reshards: dict[subprocess.Popen[bytes], _Reshard] = {}
        #: ``(slot, port)`` for each slot a reshard moved to the master on *port* but left
        #: claimed by no master, which :meth:`finish_reshard` then gave to it: see there.
        self.repairs: list[tuple[int, int]] = []

    @property
    def urls(self) -> list[str]:
        """Every node's URL, in the order of :attr:`ports`."""
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    # -- life cycle -------------------------------------------------------------------------

    def start(self, *, timeout: float = 30.0) -> None:
        """Start every node, join them into a cluster and wait until it is ok."""
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        created = subprocess.run(
            [
                _cli(),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise AssertionError(
                f"redis-cli --cluster create exited with {created.returncode}:\n"
                + _plain(created.stdout + created.stderr)
            )
        self.wait_ok(timeout=timeout)

    def stop(self) -> None:
        """Stop every node, and any reshard still running."""
        for proc in self._reshards:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            node.stop()

    def kill(self, port: int) -> None:
        """SIGKILL the node on *port*: no goodbye to the cluster; its nodes.conf stays."""
        self._node_on(port).stop(signal.SIGKILL)

    def restart(self, port: int) -> None:
        """Start the node on *port* again, after :meth:`kill` or a stop, and wait until it
        listens. It keeps its nodes.conf, so it rejoins the cluster with the same id (and no
        data: nodes do not persist). Call :meth:`wait_ok` to wait until it has caught up."""
        node = self._node_on(port)
        if not node.running:
            node.start()

    def running_ports(self) -> list[int]:
        """The ports of the nodes running now."""
        return [port for port in self.ports if self._by_port[port].running]

    # -- what the nodes say -----------------------------------------------------------------

    def info(self, port: int) -> dict[str, str]:
        """Return ``CLUSTER INFO`` of the node on *port* (empty if it does not answer)."""
        out = subprocess.run(
            [_cli(), "-p", str(port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return dict(line.split(":", 1) for line in out.split() if ":" in line)

    def cluster_nodes(self, port: int) -> list[NodeEntry]:
        """Return ``CLUSTER NODES`` as the node on *port* sees the cluster."""
        return [_parse_node(line) for line in _call(port, "cluster", "nodes").splitlines()]

    def node_id(self, port: int) -> str:
        """Return the cluster id of the node on *port* (``CLUSTER MYID``)."""
        if port not in self._ids:
            self._ids[port] = _call(port, "cluster", "myid").strip()
        return self._ids[port]

    def role(self, port: int) -> str:
        """Return the node's role from ``ROLE``: ``master`` or ``slave``."""
        reply = json.loads(_call(port, "role", json_reply=True))
        return str(reply[0])

    def master_ports(self) -> list[int]:
        """The ports of the running nodes that are masters now, each by its own
        ``CLUSTER NODES`` (``myself`` line)."""
        return [port for port, me in self._myselves().items() if me.is_master]

    def replica_ports(self) -> list[int]:
        """The ports of the running nodes that are replicas now, each by its own
        ``CLUSTER NODES`` (``myself`` line)."""
        return [port for port, me in self._myselves().items() if not me.is_master]

    def replicas_of(self, master_port: int) -> list[int]:
        """The ports of the running nodes that say they replicate the master on
        *master_port*."""
        master = self.node_id(master_port)
        return [port for port, me in self._myselves().items() if me.master_id == master]

    def slots_of(self, port: int) -> set[int]:
        """Return the slots the master on *port* serves, by its own ``CLUSTER SLOTS``
        (empty for a replica)."""
        deadline = time.monotonic() + 30
        # A node that just became a replica loads its master's data first: LOADING meanwhile.
        while (reply := _call(port, "cluster", "slots", json_reply=True)).startswith("error:"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CLUSTER SLOTS on 127.0.0.1:{port}: {reply.strip()}")
            time.sleep(0.05)
        slots: set[int] = set()
        for start, end, master, *_replicas in json.loads(reply):
            if int(master[1]) == port:
                slots.update(range(int(start), int(end) + 1))
        return slots

    # -- waiting ----------------------------------------------------------------------------

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until the cluster is whole again, as far as the running nodes go.

        That is: every running node says ``cluster_state:ok``, sees every other running node
        as healthy (no ``fail``, ``fail?``, ``handshake``, ``noaddr``) and connected on the
        cluster bus, and every slot served by a running node; every running replica has its
        replication link up; and ``redis-cli --cluster check`` from one running master exits
        0. A node that is down is allowed once the cluster copes without it (its replica
        took over): neither cluster_state nor the check notice a master just killed, for
        about the node timeout. Raise AssertionError with the last problem otherwise.
        """
        deadline = time.monotonic() + timeout
        while True:
            problem = self._problem()
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"the cluster is not ok after {timeout}s: {problem}")
            time.sleep(0.05)

    def _problem(self) -> str | None:
        """Say what keeps the cluster from being ok now, or None if it is."""
        running = self.running_ports()
        if not running:
            return "no node is running"
        try:
            for port in running:
                state = self.info(port).get("cluster_state")
                if state != "ok":
                    return f"127.0.0.1:{port} says cluster_state:{state}"
            masters: list[int] = []
            for port in running:
                for entry in self.cluster_nodes(port):
                    if entry.port in running and not entry.healthy:
                        flags = ",".join(sorted(entry.flags))
                        return f"127.0.0.1:{port} sees 127.0.0.1:{entry.port} as {flags}"
                    if entry.port in running and entry.link != "connected":
                        return f"127.0.0.1:{port} has no bus link to 127.0.0.1:{entry.port}"
                    if entry.slots and entry.port not in running:
                        return f"127.0.0.1:{port} sees slots on 127.0.0.1:{entry.port}, down"
                    if entry.myself and entry.is_master:
                        masters.append(port)
                    elif entry.myself:
                        link = _call(port, "info", "replication")
                        if "master_link_status:up" not in link:
                            return f"replica 127.0.0.1:{port} has no link to its master"
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return str(e)
        if not masters:
            return "no running node is a master"
        check = subprocess.run(
            [_cli(), "--cluster", "check", f"127.0.0.1:{masters[0]}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            return f"redis-cli --cluster check exited with {check.returncode}:\n" + _plain(
                check.stdout + check.stderr
            )
        return None

    # -- changing the cluster ---------------------------------------------------------------

    def reshard(
        self,
        from_port: int,
        to_port: int,
        slots: int,
        *,
        extra: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> None:
        """Move *slots* slots (with their keys) from the master on *from_port* to the master
        on *to_port* with ``redis-cli --cluster reshard``; wait until it is done and the
        cluster is ok. *extra* are more reshard options (``--cluster-pipeline 1``, ...)."""
        self.finish_reshard(self.reshard_process(from_port, to_port, slots, extra=extra), timeout)

    def reshard_process(
        self, from_port: int, to_port: int, slots: int, *, extra: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """Start the reshard of :meth:`reshard` and return at once, so a test can run load
        while it runs. Its output goes to :meth:`reshard_log`; end it with
        :meth:`finish_reshard` (:meth:`stop` kills it if still running)."""
        log = self.workdir / f"reshard-{len(self._reshards) + 1}.log"
        before = self.slots_of(from_port)
        argv = [
            _cli(),
            "--cluster",
            "reshard",
            f"127.0.0.1:{from_port}",
            "--cluster-from",
            self.node_id(from_port),
            "--cluster-to",
            self.node_id(to_port),
            "--cluster-slots",
            str(slots),
            "--cluster-yes",
            *extra,
        ]
        # A file, not a pipe: it writes ~130 bytes a slot, enough to fill a pipe and stall.
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self._reshards[proc] = _Reshard(log, from_port, to_port, before)
        return proc

    def reshard_log(self, proc: subprocess.Popen[bytes]) -> str:
        """Return what the reshard *proc* of :meth:`reshard_process` wrote so far."""
        return _plain(self._reshards[proc].log.read_text(errors="replace"))

    def finish_reshard(self, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
        """Wait for the reshard *proc* to end; raise AssertionError with its output unless it
        exited 0; then wait until the cluster is ok.

        Redis 7.0 now and then (about one reshard of 100 slots in 25, when the machine is
        busy) ends a reshard with exit 0 and a moved slot that its new master does not own
        in its own view (it names the old master, which has let go of it) while every other
        node names the new master; nothing mends that until the next configEpoch change.
        Such a slot is given to the new master again with ``CLUSTER SETSLOT <slot> NODE``
        on it, as redis-cli had done, and noted in :attr:`repairs`.
        """
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"the reshard did not end in {timeout}s:\n{self.reshard_log(proc)}"
            ) from None
        if proc.returncode != 0:
            raise AssertionError(
                f"the reshard exited with {proc.returncode}:\n{self.reshard_log(proc)}"
            )
        self._repair(self._reshards[proc])
        self.wait_ok()

    def _repair(self, reshard: _Reshard) -> None:
        """Give the receiving master the slots the reshard moved that no master claims."""
        moved = reshard.slots_before - self.slots_of(reshard.from_port)
        claimed: set[int] = set()
        for port in self.master_ports():
            claimed |= self.slots_of(port)
        target = self.node_id(reshard.to_port)
        for slot in sorted(moved - claimed):
            reply = _call(reshard.to_port, "cluster", "setslot", str(slot), "node", target)
            if reply.strip() != "OK":
                raise AssertionError(f"CLUSTER SETSLOT {slot} NODE on {reshard.to_port}: {reply}")
            self.repairs.append((slot, reshard.to_port))

    def failover(self, replica_port: int, *, timeout: float = 30.0) -> float:
        """Promote the replica on *replica_port* with ``CLUSTER FAILOVER`` (its master agrees
        and becomes its replica); wait until ``ROLE`` says master and the cluster is ok.
        Return the seconds it took to become master.

        ``CLUSTER FAILOVER`` answers OK even when the replica cannot tell its master (it has
        no bus link to it that moment): then nothing happens, and the replica gives up after
        Redis's 5 s manual failover timeout. So ask again after each such timeout.
        """
        if self.role(replica_port) != "slave":
            raise ValueError(f"127.0.0.1:{replica_port} is not a replica")
        started = time.monotonic()
        deadline = started + timeout
        asked = -MANUAL_FAILOVER_TIMEOUT
        while self.role(replica_port) != "master":
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"127.0.0.1:{replica_port} is no master after {timeout}s")
            if now - asked > MANUAL_FAILOVER_TIMEOUT + 0.5:
                reply = _call(replica_port, "cluster", "failover").strip()
                if reply != "OK":
                    raise AssertionError(f"CLUSTER FAILOVER on 127.0.0.1:{replica_port}: {reply}")
                asked = now
            time.sleep(0.02)
        took = time.monotonic() - started
        self.wait_ok(timeout=max(deadline - time.monotonic(), 1.0))
        return took

    # -- inside -----------------------------------------------------------------------------

    def _myselves(self) -> dict[int, NodeEntry]:
        """Each running node's ``myself`` line of its ``CLUSTER NODES``, by port."""
        found: dict[int, NodeEntry] = {}
        for port in self.running_ports():
            found[port] = next(e for e in self.cluster_nodes(port) if e.myself)
        return found

    def _node_on(self, port: int) -> procs.Process:
        try:
            return self._by_port[port]
        except KeyError:
            raise ValueError(f"no node of this cluster is on port {port}") from None

    def _node(self, port: int) -> procs.Process:
        folder = self.workdir / f"node-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf")]
        timing = [
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica's full sync otherwise waits 5 s for more replicas to share it.
            "--repl-diskless-sync-delay",
            "0",
        ]
        return procs.redis_server(folder, port, extra=[*cluster, *timing])


@dataclass(frozen=True)
class _Reshard:
    """A reshard started by :meth:`ClusterNodes.reshard_process`."""

    log: Path
    from_port: int
    to_port: int
    #: The slots the master on *from_port* owned before.
    slots_before: set[int]


def _cli() -> str:
    return procs.find_binary("redis-cli")


def _call(port: int, *args: str, json_reply: bool = False) -> str:
    """Run ``redis-cli -p port args`` and return its output; RuntimeError if it fails
    (a Redis error reply is output, not a failure, with redis-cli)."""
    argv = [_cli(), "-p", str(port), *(["--json"] if json_reply else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} on 127.0.0.1:{port}: {done.stderr.strip()}")
    return done.stdout


def _parse_node(line: str) -> NodeEntry:
    """Parse one line of ``CLUSTER NODES``:
    ``<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot> ...``."""
    fields = line.split()
    if len(fields) < 8 or ":" not in fields[1]:
        # An error reply (redis-cli exits 0 on one), or a node the bus has not met yet.
        raise RuntimeError(f"CLUSTER NODES gave {line!r}")
    slots: set[int] = set()
    for part in fields[8:]:
        if part.startswith("["):  # [slot->-id] migrating, [slot-<-id] importing
            continue
        first, _, last = part.partition("-")
        slots.update(range(int(first), int(last or first) + 1))
    return NodeEntry(
        id=fields[0],
        port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
        flags=frozenset(fields[2].split(",")),
        master_id=None if fields[3] == "-" else fields[3],
        link=fields[7],
        slots=frozenset(slots),
    )


def _plain(text: str) -> str:
    """*text* without the colours redis-cli --cluster prints even into a pipe."""
    return _ANSI.sub("", text)


def _free_ports(count: int) -> list[int]:
    """Return *count* free ports whose cluster bus port (+10000) is free too."""
    low, high = _port_range()
    span = high - low + 1
    first = (time.monotonic_ns() // 1000) % span
    ports: list[int] = []
    for i in range(span):  # round from a varying start, so runs side by side rarely collide
        if len(ports) == count:
            break
        port = low + (first + i) % span
        if _free(port) and _free(port + 10000):
            ports.append(port)
    assert len(ports) == count, "no free ports for a cluster"
    return ports


def _port_range() -> tuple[int, int]:
    """The ports to pick nodes' from: where the bus port (+10000) stays below the kernel's
    ephemeral range too, if that leaves room, so that no outgoing connection takes a
    node's port while it is down between a kill and a restart."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return MIN_PORT, MAX_PORT
    high = min(MAX_PORT, ephemeral - 1 - 10000)
    return (MIN_PORT, high) if high - MIN_PORT >= 1000 else (MIN_PORT, MAX_PORT)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
