"""The ``xshard`` command line."""

from coordinator.cli.commands import Parser, log_level_parent, main

__all__ = ["Parser", "log_level_parent", "main"]
