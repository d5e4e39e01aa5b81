"""Errors raised by the recovery policies.

XshardError                      (coordinator.errors)
└── RecoveryError
    ├── IllegalTransition        a state machine was asked for a move it forbids (e.g. OPEN -> CLOSED)
    └── UnknownSetting           a level, strategy, failure kind or number out of range (also a ValueError)
"""

from __future__ import annotations

from ..errors import XshardError


class RecoveryError(XshardError):
    """Root of every error raised by ``coordinator.recovery``."""


class IllegalTransition(RecoveryError):
    """A state machine was asked to make a move that its transition table forbids."""

    def __init__(self, machine: str, current: object, target: object) -> None:
        super().__init__(f"{machine}: illegal transition {current} -> {target}")
        self.machine = machine
        self.current = current
        self.target = target


class UnknownSetting(RecoveryError, ValueError):
    """A fault-tolerance level, recovery strategy, failure kind or numeric setting is not valid."""
