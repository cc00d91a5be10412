"""Argument types shared by the commands: each rejects a bad value with a one-line error.

``Parser`` turns the ``ArgumentTypeError`` into ``hotpatch CMD: error: argument --x: <message>``
on one line and exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn, TypeVar

N = TypeVar("N", int, float)


def _number(
    text: str, convert: Callable[[str], N], what: str, is_valid: Callable[[N], bool], rule: str
) -> N:
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not is_valid(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, not {text.strip()}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a count: clients, workers)."""
    return _number(text, int, "a whole number", lambda v: v >= 1, "at least 1")


def pid(text: str) -> int:
    """A process id: a whole number of at least 1 (0 and negatives name process groups)."""
    return _number(text, int, "a process id", lambda v: v >= 1, "a positive process id")


def seconds(text: str) -> float:
    """A duration in seconds: finite and greater than 0."""
    return _number(
        text,
        float,
        "a number of seconds",
        lambda v: math.isfinite(v) and v > 0,
        "a positive number of seconds",
    )


def wait_seconds(text: str) -> float:
    """How long to wait, in seconds: finite and at least 0 (0: do not wait)."""
    return _number(
        text,
        float,
        "a number of seconds",
        lambda v: math.isfinite(v) and v >= 0,
        "a non-negative number of seconds",
    )


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit code 2.

    argparse prints the whole usage before the error; a script or an operator reading a log wants
    the one line that says which argument is wrong (``--help`` still shows the usage).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
