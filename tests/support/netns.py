"""Separate network hosts on one machine: network namespaces joined by a bridge, each with its own
address on a private /24 and no route anywhere else (no default route, no NAT).

The root namespace joins the bridge too (address .1), so the test itself can reach every host by
address, as a producer on the same network would. Needs root and iproute2. Every name carries a
random suffix, so runs side by side never meet; ``teardown`` kills whatever runs inside and removes
every link and namespace, also after a failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import stop


class NetnsUnavailable(RuntimeError):
    """This machine cannot build namespaces (not root, no ``ip``)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 that no interface of this machine is on (runs side by side take different ones)."""
    used = set()
    for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in link.get("addr_info", []):
            used.add(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network)
    for _ in range(200):
        net = ipaddress.ip_network(f"10.213.{secrets.randbelow(240) + 7}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@dataclass
class Host:
    """One namespace: a name, an address, and the processes started in it."""

    name: str
    ns: str
    address: str
    veth: str  # the root side of its link, on the bridge
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)

    def spawn(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` inside this host (its own session, so it and its children stop together)."""
        with open(log, "ab") as out:
            p = subprocess.Popen([*self.prefix(), *args], stdout=out, stderr=out, env=env, cwd=cwd,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self) -> list[int]:
        """Every process running in the namespace (also any a started one left behind)."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                stop(p, signal.SIGKILL)
        for _ in range(50):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                p.wait(5)

    def stop_all(self) -> None:
        """SIGTERM first (a clean stop), then whatever is left is killed."""
        for p in self.procs:
            stop(p, signal.SIGTERM, timeout=15)
        self.kill_all()

    def unplug(self) -> None:
        """Take its link down: nothing reaches it and it reaches nothing."""
        _ip("link", "set", self.veth, "down", check=False)

    def plug(self) -> None:
        _ip("link", "set", self.veth, "up")


@dataclass
class Network:
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    _links: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"fbr{self.suffix}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where the test and the producer are)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def start(self) -> Network:
        why = unavailable()
        if why:
            raise NetnsUnavailable(why)
        self.subnet = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> Host:
        assert self.subnet is not None
        n = len(self.hosts)
        ns = f"ferry-{name}-{self.suffix}"
        address = str(self.subnet.network_address + 2 + n)
        outer, inner = f"fv{self.suffix}{n}", f"fp{self.suffix}{n}"
        _ip("netns", "add", ns)
        host = Host(name, ns, address, outer)
        self.hosts[name] = host
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        inside = ("netns", "exec", ns, "ip")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "link", "set", inner, "name", "eth0")
        _ip(*inside, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip(*inside, "link", "set", "eth0", "up")
        return host

    def routes(self, host: Host) -> list[str]:
        """The routes a host has (only its own subnet: there is no way out)."""
        out = _ip("netns", "exec", host.ns, "ip", "-j", "route").stdout
        return [r.get("dst", "") for r in json.loads(out or "[]")]

    def teardown(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        for host in self.hosts.values():
            _ip("netns", "del", host.ns, check=False)
        for link in reversed(self._links):
            _ip("link", "del", link, check=False)
        self.hosts.clear()
        self._links.clear()
