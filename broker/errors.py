"""Errors raised by the broker package.

BrokerError
├── BrokerUnavailable     the Redis/Valkey server cannot be reached (wraps redis errors)
├── EmbeddedBrokerError   the embedded valkey-server could not be started
├── SettingError          a setting out of range (a backoff, a state move); also a ValueError
│   └── IllegalTransition a state machine was asked for a move it forbids
└── MessageError          a stream entry cannot be decoded
    ├── SchemaError       missing field, unknown message type or schema version
    └── TensorError       bad tensor ext payload: dtype, shape, size limits
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the broker package raises."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or refused the operation."""


class EmbeddedBrokerError(BrokerError):
    """The embedded valkey-server could not be started."""


class MessageError(BrokerError):
    """A message cannot be decoded."""


class SchemaError(MessageError):
    """A message lacks a required field or has an unknown type or schema version."""


class TensorError(MessageError):
    """A tensor payload is malformed or over the size limits."""


class SettingError(BrokerError, ValueError):
    """A setting is out of range, or a value is not one of a closed set."""


class IllegalTransition(SettingError):
    """A state machine was asked to make a move that its transition table forbids."""

    def __init__(self, machine: str, current: object, target: object) -> None:
        super().__init__(f"{machine}: illegal transition {current} -> {target}")
        self.machine = machine
        self.current = current
        self.target = target
