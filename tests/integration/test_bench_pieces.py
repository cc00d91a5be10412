"""``benchmarks/bench_pieces.py`` on the committed sdists: the engine's compile by the statement
gives, on real releases, the code a whole-module compile gives, and reuses unchanged statements."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_real_releases_compile_by_the_statement_to_the_code_of_a_whole_compile() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_pieces
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = bench_pieces.main(["--packages", "six,cachetools", "--repeat", "1"])
    assert rows, "no release step found in benchmarks/replay_data"
    assert [(r["module"], r["why"]) for r in rows if not r["exact"]] == []
    assert any(r["new"] < r["statements"] for r in rows)  # unchanged statements were reused
