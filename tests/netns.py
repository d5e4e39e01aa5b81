"""Separate hosts on one machine, for ``test_hosts``: one network namespace per host, each with a veth
pair to a bridge in a namespace of its own (the switch), addresses in a private subnet that exists
only inside these namespaces, and a loopback up (browsers need it). Each host has its own HOME and
cache directory. ``cut``/``restore`` are the commands that take a host's link down and up again (its
end on the switch). ``close`` kills whatever still runs in the namespaces and deletes them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.7"  # /24, only inside the test's namespaces


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def why_refused() -> str | None:
    """None when this process may create network namespaces; else why not (the skip reason)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"xsprobe{uuid.uuid4().hex[:6]}"
    try:
        run_ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        err = getattr(e, "stderr", "") or str(e)
        return f"ip netns add is refused here ({err.strip()}); the multi-host tests need root or CAP_SYS_ADMIN"
    run_ip("netns", "del", probe)
    return None


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    netns: str
    address: str
    link: str  # its veth end on the switch
    switch: str  # the switch's namespace
    home: Path
    cache: Path

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: in its namespace, with its HOME and cache directory."""
        env = [f"HOME={self.home}", f"XSHARD_CACHE_DIR={self.cache}"]
        return ["ip", "netns", "exec", self.netns, "env", *env, *argv]

    @property
    def cut(self) -> list[str]:
        return ["ip", "-n", self.switch, "link", "set", self.link, "down"]

    @property
    def restore(self) -> list[str]:
        return ["ip", "-n", self.switch, "link", "set", self.link, "up"]


class Network:
    """Hosts on one switch; create them with ``add``, remove all with ``close``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = f"xs{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []

    def start(self) -> Network:
        self._netns_add(self.switch)
        run_ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        run_ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def _netns_add(self, name: str) -> None:
        run_ip("netns", "add", name)
        self._namespaces.append(name)
        run_ip("-n", name, "link", "set", "lo", "up")

    def add(self, name: str) -> Host:
        n = len(self.hosts) + 1
        netns, inner, outer = f"{self.tag}-{name}", f"{self.tag}{name}0", f"{self.tag}{name}1"
        self._netns_add(netns)
        run_ip("link", "add", inner, "netns", netns, "type", "veth", "peer", "name", outer, "netns", self.switch)
        run_ip("-n", self.switch, "link", "set", outer, "master", "br0")
        run_ip("-n", self.switch, "link", "set", outer, "up")
        run_ip("-n", netns, "addr", "add", f"{SUBNET}.{n}/24", "dev", inner)
        run_ip("-n", netns, "link", "set", inner, "up")
        home, cache = self.root / name / "home", self.root / name / "cache"
        home.mkdir(parents=True)
        cache.mkdir(parents=True)
        host = Host(name, netns, f"{SUBNET}.{n}", outer, self.switch, home, cache)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill what still runs in the hosts (processes the test started), then delete the namespaces."""
        for netns in reversed(self._namespaces):
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._namespaces.clear()
