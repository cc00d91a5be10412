"""examples/canary/ as documented: real HTTP, real threads, the real ramp, both outcomes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "examples" / "canary" / "run.py"


@pytest.mark.parametrize(
    ("flags", "code", "outcome"),
    [
        ([], 0, "outcome: promoted (complete)"),
        (["--broken"], 1, "outcome: rolled_back (error_rate)"),
    ],
)
def test_the_canary_example_promotes_or_rolls_back(
    flags: list[str], code: int, outcome: str
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--step-s",
            "0.4",
            "--min-calls",
            "25",
            "--timeout-s",
            "90",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert outcome in out, out
    if not flags:
        assert ", 0 failed" in out, out
        assert "applied (live)" in out, out
    else:
        assert "baseline (live)" in out and "rejected canary error_rate" in out, out
