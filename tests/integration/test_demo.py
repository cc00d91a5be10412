"""The README's first command runs `hotpatch demo`: it must keep working, with zero failures."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_every_part_without_a_failed_request() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hotpatch", "--log-level", "warning", "demo", "--clients", "3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "requests served:" in proc.stdout and "failures: 0" in proc.stdout, output
    assert "in-process hot patching: OK" in proc.stdout, output
    assert "gunicorn rolling reload: OK" in proc.stdout, output
    assert "[refused]     syntax error" in proc.stdout and "[rolled back]" in proc.stdout, output
