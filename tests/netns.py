"""A lab of network namespaces: several "hosts" on one machine, multi-host tests without a cloud.

Each host is a network namespace with one link, a veth pair whose other end is a port of a bridge
in a namespace of its own (the switch), so nothing is added to the machine's own network.
Addresses come from 198.18.0.0/15, the range reserved for network tests. Every host's link gets a
`tc netem` delay where the kernel has netem (`delay_note` says why not otherwise). Processes run
inside a host through `ip netns exec`; `close()` stops those it started, by PID, and deletes every
namespace it made, which takes their veths and the bridge with them, also after a failure.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from client.launcher import Process

PREFIX = "llx"
LLAMADIST = str(Path(sys.executable).parent / "llamadist")
TEST_RANGE = ipaddress.ip_network("198.18.0.0/15")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """None when this machine lets us make namespaces, veth pairs and bridges; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"the kernel refuses network namespaces: {out.stderr.strip()}"
    try:
        for args, what in (
            (("link", "add", "v0", "type", "veth", "peer", "name", "v1"), "veth pairs"),
            (("link", "add", "br0", "type", "bridge"), "bridges"),
        ):
            out = _ip("-n", probe, *args, check=False)
            if out.returncode != 0:
                return f"the kernel refuses {what}: {out.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remove_stale() -> list[str]:
    """Deletes namespaces that labs of processes no longer alive left behind (a killed run)."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}-(\d+)-.+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    port: str  # the switch's port (bridge member) that is this host's link


class NetnsLab:
    """Hosts on a switch, each in its own namespace; a context manager that removes it all."""

    def __init__(
        self,
        host_names: list[str],
        log_dir: Path,
        subnet: str = "198.18.0.0/24",
        delay_ms: float = 2.0,
    ):
        network = ipaddress.ip_network(subnet)
        if not network.subnet_of(TEST_RANGE):
            raise ValueError(f"{subnet} is outside {TEST_RANGE}, the range reserved for tests")
        self.tag = f"{PREFIX}-{os.getpid()}"
        self.log_dir = log_dir
        self.switch = f"{self.tag}-switch"
        addresses = list(network.hosts())[10:]
        self.hosts = {
            name: Host(name, f"{self.tag}-{name}", str(addresses[i]), f"p{i}")
            for i, name in enumerate(host_names)
        }
        self.prefix_len = network.prefixlen
        self.delay_ms = delay_ms
        self.delay_note = ""
        self.processes: list[Process] = []
        self._popened: list[subprocess.Popen] = []
        self._made: list[str] = []

    # ------------------------------------------------------------------ building

    def start(self) -> NetnsLab:
        try:
            remove_stale()
            self._add_netns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts.values():
                self._add_host(host)
        except BaseException:
            self.close()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        _ip(
            "-n", self.switch, "link", "add", host.port, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns,
        )  # fmt: skip
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.prefix_len}", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        if self.delay_ms and not self.delay_note:
            qdisc = ["qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{self.delay_ms}ms"]
            out = subprocess.run(
                ["tc", "-n", host.netns, *qdisc], capture_output=True, text=True, timeout=30
            )
            if out.returncode != 0:
                self.delay_note = (
                    f"no {self.delay_ms} ms link delay: `tc ... netem` failed "
                    f"({out.stderr.strip()}; the kernel lacks sch_netem)"
                )

    def delay_active(self, host: str) -> bool:
        out = subprocess.run(
            ["tc", "-n", self.hosts[host].netns, "qdisc", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return "netem" in out.stdout

    # ------------------------------------------------------------------ using

    def spawn(self, host: str, args: list[str], name: str | None = None) -> Process:
        """Starts `llamadist ARGS` inside HOST (stopped by close())."""
        process = Process(
            name or host, args, self.log_dir, prefix=["ip", "netns", "exec", self.hosts[host].netns]
        )
        self.processes.append(process)
        return process

    def run(
        self, host: str, argv: list[str], timeout_s: float = 300
    ) -> subprocess.CompletedProcess:
        """Runs a command inside HOST to its end."""
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[host].netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def popen(self, host: str, argv: list[str]) -> subprocess.Popen:
        """Starts a command inside HOST with text pipes to its stdin and from its stdout (stderr
        joins stdout); the caller talks to it and waits for it, close() kills it if still alive."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].netns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._popened.append(process)
        return process

    def limit_rate(self, host: str, mbit: int) -> None:
        """Caps what HOST receives (the switch's egress on its port) with a token bucket."""
        port = self.hosts[host].port
        tbf = ["tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "200ms"]
        argv = ["tc", "-n", self.switch, "qdisc", "replace", "dev", port, "root", *tbf]
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30)

    def unplug(self, host: str) -> None:
        """HOST's cable out, to be put back (`plug`): its switch port goes down."""
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "down")

    def plug(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[host].port, "up")

    def cut(self, host: str) -> None:
        """Pulls HOST's cable: deletes its link (both ends of the veth pair)."""
        _ip("-n", self.switch, "link", "del", self.hosts[host].port)

    # ------------------------------------------------------------------ removing

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist."""
        return [n for n in namespaces() if n.startswith(self.tag + "-")]

    def close(self) -> None:
        for popened in self._popened:  # `ip netns exec` execs the command: this is its PID
            if popened.poll() is None:
                popened.kill()
                popened.wait(30)
        self._popened.clear()
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> NetnsLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
