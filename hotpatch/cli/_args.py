"""Argument types shared by the commands: each rejects a bad value with a one-line error.

argparse turns the ``ArgumentTypeError`` into ``hotpatch CMD: error: argument --x: <message>`` and
exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a count: clients, workers)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def pid(text: str) -> int:
    """A process id: a whole number of at least 1 (0 and negatives name process groups)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive process id, not {value}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds: finite and greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def wait_seconds(text: str) -> float:
    """How long to wait, in seconds: finite and at least 0 (0: do not wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number of seconds, not {text}")
    return value


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit code 2.

    argparse prints the whole usage before the error; a script or an operator reading a log wants
    the one line that says which argument is wrong (``--help`` still shows the usage).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
