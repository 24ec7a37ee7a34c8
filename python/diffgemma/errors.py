"""Exceptions raised by diffgemma: every bad input ends in one of these, never a crash."""

from __future__ import annotations


class Error(Exception):
    """Base class of every diffgemma error.

    `cli`, when given, is the same message worded for the command line (flags instead of Python keywords);
    the `diffgemma` command prints it instead of the message."""

    def __init__(self, *args: object, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli = cli


class GGUFError(Error):
    """An unreadable, truncated, inconsistent or foreign GGUF file."""
