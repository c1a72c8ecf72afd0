"""A Redis Sentinel deployment for tests: a primary, a replica and three sentinels, on free ports.

The sentinels know each other and the replica from their configuration files (``known-*``
lines with fixed ids), so they are ready at once instead of after their hello messages, and
they act fast: a master is down after 500 ms without an answer.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from demo import procs

#: How long a node may not answer before a sentinel thinks it down, in milliseconds.
DOWN_AFTER_MS = 500
#: Sentinel's failover-timeout: also bounds how soon the same master can fail over again.
FAILOVER_TIMEOUT_MS = 2000


class SentinelSet:
    """A primary and a replica watched as *name* by three sentinels (quorum 2).

    *password* protects both Redis nodes (``requirepass``, ``masterauth``), and
    *sentinel_password* the sentinels themselves.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "gate",
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.name = name
        self.password = password
        self.sentinel_password = sentinel_password
        self.folder = workdir / f"sentinel-set-{secrets.token_hex(3)}"
        self.folder.mkdir(parents=True)
        self.node_ports = [procs.free_port(), procs.free_port()]
        self.nodes = [
            self._node(self.node_ports[0], replica_of=None),
            self._node(self.node_ports[1], replica_of=self.node_ports[0]),
        ]
        self.sentinel_ports = [procs.free_port() for _ in range(3)]
        self.sentinels = [self._sentinel(port) for port in self.sentinel_ports]

    def url(self, *, db: int | None = None, password: str | None = None, **params: str) -> str:
        """Return the redis+sentinel:// URL of the master (with *params* as its query)."""
        secret = self.password if password is None else password
        auth = f":{urllib.parse.quote(secret, safe='')}@" if secret else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        path = f"/{self.name}" + (f"/{db}" if db is not None else "")
        if self.sentinel_password is not None and "sentinel_password" not in params:
            params["sentinel_password"] = self.sentinel_password
        query = "?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote) if params else ""
        return f"redis+sentinel://{auth}{hosts}{path}{query}"

    def start(self) -> None:
        """Start every process; return once the replica is in sync and the sentinels agree."""
        try:
            for node in self.nodes:
                node.start()
            self._wait(lambda: self._link_up(self.node_ports[1]), "the replica in sync")
            self._write_configs()
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait(self._sentinels_ready, "the sentinels ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in (*self.sentinels, *self.nodes):
            p.stop(signal.SIGKILL)

    def node(self, port: int) -> redis_sync.Redis:
        """Return a client of the Redis node on *port* (each call a new one: close it)."""
        return redis_sync.Redis(port=port, password=self.password, socket_timeout=2)

    def sentinel(self, index: int = 0) -> redis_sync.Redis:
        return redis_sync.Redis(
            port=self.sentinel_ports[index], password=self.sentinel_password, socket_timeout=2
        )

    def master_port(self) -> int:
        """Return the port of the master the first sentinel names."""
        with self.sentinel() as s:
            return int(s.sentinel_get_master_addr_by_name(self.name)[1])

    def replica_port(self) -> int:
        """Return the port of the node that is not the master the first sentinel names."""
        master = self.master_port()
        return next(p for p in self.node_ports if p != master)

    def role(self, port: int) -> str:
        with self.node(port) as r:
            return str(r.execute_command("ROLE")[0].decode())

    def failover(self) -> None:
        """Ask a sentinel for a failover (the way an operator does), retrying while the replica
        is not yet good enough to promote."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.sentinel() as s:
                    s.execute_command("SENTINEL", "FAILOVER", self.name)
                return
            except redis_sync.ResponseError as e:
                if time.monotonic() > deadline or "NOGOODSLAVE" not in str(e):
                    raise
                time.sleep(0.05)

    def kill(self, port: int) -> None:
        """Kill the Redis node on *port* at once (SIGKILL), as a crash does."""
        self.nodes[self.node_ports.index(port)].stop(signal.SIGKILL)

    def wait_for_master(self, port: int, within: float = 10.0) -> float:
        """Wait until every sentinel names the node on *port* and it says it is a master."""

        def named() -> bool:
            for i in range(len(self.sentinels)):
                with self.sentinel(i) as s:
                    if int(s.sentinel_get_master_addr_by_name(self.name)[1]) != port:
                        return False
            return self.role(port) == "master"

        return self._wait(named, f"the node on {port} the master", within)

    def _node(self, port: int, *, replica_of: int | None) -> procs.Process:
        extra = ["--dbfilename", f"dump-{port}.rdb"]
        extra += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.password is not None:
            extra += ["--requirepass", self.password, "--masterauth", self.password]
        if replica_of is not None:
            extra += ["--replicaof", "127.0.0.1", str(replica_of)]
        return procs.redis_server(self.folder, port, extra=extra)

    def _sentinel(self, port: int) -> procs.Process:
        conf = self.folder / f"sentinel-{port}.conf"
        return procs.Process(
            [procs.find_binary("redis-server"), str(conf), "--sentinel"],
            port=port,
            log=self.folder / f"sentinel-{port}.log",
        )

    def _write_configs(self) -> None:
        ids = {port: secrets.token_hex(20) for port in self.sentinel_ports}
        primary, replica = self.node_ports
        for port in self.sentinel_ports:
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {self.folder}",
                f"sentinel myid {ids[port]}",
                f"sentinel monitor {self.name} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}",
                f"sentinel known-replica {self.name} 127.0.0.1 {replica}",
            ]
            lines += [
                f"sentinel known-sentinel {self.name} 127.0.0.1 {other} {ids[other]}"
                for other in self.sentinel_ports
                if other != port
            ]
            if self.password is not None:
                lines.append(f"sentinel auth-pass {self.name} {self.password}")
            if self.sentinel_password is not None:
                lines += [
                    f"requirepass {self.sentinel_password}",
                    f"sentinel sentinel-pass {self.sentinel_password}",
                ]
            (self.folder / f"sentinel-{port}.conf").write_text("\n".join(lines) + "\n")

    def _link_up(self, port: int) -> bool:
        with self.node(port) as r:
            return bool(r.info("replication").get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for i in range(len(self.sentinels)):
            with self.sentinel(i) as s:
                master = s.sentinel_master(self.name)
                replicas = s.sentinel_slaves(self.name)
                if master["num-other-sentinels"] != 2 or len(replicas) != 1:
                    return False
                if replicas[0]["flags"] != "slave" or replicas[0]["master-link-status"] != "ok":
                    return False
        return True

    def _wait(self, check: Callable[[], bool], what: str, within: float = 15.0) -> float:
        started = time.monotonic()
        while True:
            with contextlib.suppress(redis_sync.RedisError, OSError, KeyError, IndexError):
                if check():
                    return time.monotonic() - started
            if time.monotonic() - started > within:
                logs = "\n".join(
                    f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.folder.glob("*.log")
                )
                pytest.fail(f"{what}: not within {within} s\n{logs}")
            time.sleep(0.02)


@contextlib.contextmanager
def sentinel_set(
    workdir: Path, *, password: str | None = None, sentinel_password: str | None = None
) -> Iterator[SentinelSet]:
    """Run a `SentinelSet` in *workdir* for the block, then stop it."""
    deployment = SentinelSet(workdir, password=password, sentinel_password=sentinel_password)
    deployment.start()
    try:
        yield deployment
    finally:
        deployment.stop()


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """Make a test CA and a certificate it signs for 127.0.0.1; return (ca, cert, key)."""
    ca, ca_key = folder / "ca.crt", folder / "ca.key"
    cert, key, request = folder / "node.crt", folder / "node.key", folder / "node.csr"
    names = folder / "san.cnf"
    names.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout {ca_key} -out {ca} -days 2 -subj /CN=test-ca",
        f"req -newkey rsa:2048 -nodes -keyout {key} -out {request} -subj /CN=127.0.0.1",
        f"x509 -req -in {request} -CA {ca} -CAkey {ca_key} -CAcreateserial -out {cert}"
        f" -days 2 -extfile {names}",
    ):
        argv = [procs.find_binary("openssl"), *command.split()]  # our paths hold no spaces
        subprocess.run(argv, check=True, capture_output=True)
    return ca, cert, key


def tls_master_and_sentinel(folder: Path, ca: Path, cert: Path, key: Path) -> list[procs.Process]:
    """Return a master and one sentinel watching it as ``gate``, both speaking only TLS."""
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    node_port, sentinel_port = procs.free_port(), procs.free_port()
    argv = [procs.find_binary("redis-server"), "--port", "0", "--tls-port", str(node_port)]
    node = procs.Process(
        [*argv, "--bind", "127.0.0.1", "--save", "", "--dir", str(folder), *tls],
        port=node_port,
        log=folder / "tls-redis.log",
    )
    conf = folder / "tls-sentinel.conf"
    conf.write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {folder}\ntls-replication yes\n"
        f"sentinel monitor gate 127.0.0.1 {node_port} 1\n"
    )
    sentinel = procs.Process(
        [procs.find_binary("redis-server"), str(conf), "--sentinel", *tls],
        port=sentinel_port,
        log=folder / "tls-sentinel.log",
    )
    return [node, sentinel]
