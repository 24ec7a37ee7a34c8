"""Exceptions raised by diffgemma: every bad input ends in one of these, never a crash."""


class Error(Exception):
    """Base class of every diffgemma error."""


class GGUFError(Error):
    """An unreadable, truncated, inconsistent or foreign GGUF file."""
