"""A real Redis Cluster of three masters on loopback, for the tests that need one."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from demo import procs

#: A node's cluster bus listens on its port + 10000, so the node's port must stay below this.
MAX_PORT = 55535


class ClusterNodes:
    """Three redis-server nodes in cluster mode, joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = _free_ports(masters)
        self.nodes = [self._node(port) for port in self.ports]

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        cli = procs.find_binary("redis-cli")
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(self.info(port).get("cluster_state") == "ok" for port in self.ports):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def info(self, port: int) -> dict[str, str]:
        """Return ``CLUSTER INFO`` of the node on *port*."""
        out = subprocess.run(
            [procs.find_binary("redis-cli"), "-p", str(port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return dict(line.split(":", 1) for line in out.split() if ":" in line)

    def _node(self, port: int) -> procs.Process:
        folder = self.workdir / f"node-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", str(folder / "nodes.conf")]
        return procs.redis_server(folder, port, extra=[*cluster, "--cluster-node-timeout", "2000"])


def _free_ports(count: int) -> list[int]:
    """Return *count* free ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    for port in range(20000 + (time.monotonic_ns() // 1000) % 30000, MAX_PORT):
        if len(ports) == count:
            break
        if _free(port) and _free(port + 10000):
            ports.append(port)
    assert len(ports) == count, "no free ports for a cluster"
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
