"""Browser names and where their executables live, and where the pages' onnxruntime-web is: the coordinator
checks them before starting local workers (and ``xshard doctor`` reports them), the worker launches them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

BROWSERS = ("chromium", "firefox", "edge")

_CANDIDATES: dict[str, Sequence[str]] = {
    "chromium": ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "chrome"),
    "edge": ("microsoft-edge", "microsoft-edge-stable", "msedge"),
    "firefox": ("/usr/lib/firefox-esr/firefox-esr", "firefox-esr", "firefox"),
}
_ENV = {"chromium": "XSHARD_CHROMIUM", "edge": "XSHARD_EDGE", "firefox": "XSHARD_FIREFOX"}
_PACKAGES = {"chromium": "chromium", "firefox": "firefox-esr", "edge": "microsoft-edge-stable"}


def find_executable(browser: str) -> str | None:
    """The browser's executable, from ``XSHARD_<BROWSER>`` or the usual install paths; None if absent."""
    if browser not in _CANDIDATES:
        raise ValueError(f"unknown browser {browser!r}; choose from {', '.join(BROWSERS)}")
    env = os.environ.get(_ENV[browser])
    for name in ([env] if env else []) + list(_CANDIDATES[browser]):
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


def install_hint(browser: str) -> str:
    return (
        f"{browser} is not installed: apt-get install {_PACKAGES[browser]} (or set {_ENV[browser]} to its executable)"
    )


def find_ort_dist(start: Path | None = None) -> Path | None:
    """Locate ``node_modules/onnxruntime-web/dist`` (what ``npm ci`` installs) upward from ``start`` (default:
    this package, so the checkout it lives in)."""
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        candidate = parent / "node_modules" / "onnxruntime-web" / "dist"
        if (candidate / "ort.all.min.mjs").is_file():
            return candidate
    return None
