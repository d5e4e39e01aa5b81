"""Child processes that die with their parent: the embedded broker, workers, browsers.

``die_with_parent`` is a ``preexec_fn``: on Linux it asks the kernel to SIGKILL the child when the
process that started it dies (``PR_SET_PDEATHSIG``), so a SIGKILLed worker leaves no orphan browser.
Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
