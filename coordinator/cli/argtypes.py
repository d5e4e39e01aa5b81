"""What every ``xshard`` subcommand shares: exit codes and argparse value types."""

from __future__ import annotations

import argparse

EXIT_FAILED = 1  # the run failed: browsers, broker, a request
EXIT_USAGE = 2  # bad usage or bad input, reported before anything starts


def shard_count(value: str) -> int | str:
    """A shard count >= 1, or ``auto`` (sized to the pages' memory)."""
    if value.strip().lower() == "auto":
        return "auto"
    return positive_int(value)


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def positive_float(value: str) -> float:
    x = _number(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def non_negative_float(value: str) -> float:
    x = _number(value)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return x


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: each shard's precision (``coordinator.planning.precision``), checked against ``--platform``."""
    from coordinator.planning.precision import DTYPES

    parser.add_argument(
        "--dtype",
        type=str.lower,
        choices=DTYPES,
        default="fp32",
        help="shard precision: fp32 (default), fp16, q8, q4, or auto (per shard, the lowest that keeps "
        "its measured agreement with fp32)",
    )
