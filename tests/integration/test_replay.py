"""The replay benchmark's short form: real releases hot-patched into one process behave like a restart.

``benchmarks/bench_replay.py`` replays consecutive releases of real PyPI packages into one live
process with ``patch_many`` and runs each package's own tests there after every step, comparing
the outcome of every test id with a fresh process on the same release. This runs it on the sdists
committed under ``benchmarks/replay_data/`` (no network), with real subprocesses and deadlines,
and holds the engine to its promise: no step may be applied and then behave differently.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench() -> types.ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_replay
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_replay


def run_replay(tmp_path: Path, *args: str) -> dict[str, Any]:
    bench_replay = load_bench()
    out = tmp_path / "replay.json"
    code = bench_replay.main(
        [*args, "--offline", "--run-timeout", "240", "--test-timeout", "60", "--json", str(out)]
    )
    assert code == 0
    report: dict[str, Any] = json.loads(out.read_text("utf-8"))
    return report


def check_complete(report: dict[str, Any], *, steps: int) -> None:
    """Every step was judged (none unknown), and the harness itself agrees with a fresh run."""
    hp = report["totals"]["hotpatch"]
    assert hp["steps"] == steps, report["totals"]
    assert hp["unknown"] == 0, report["packages"]
    assert hp["errors"] == 0, [
        s for p in report["packages"] for s in p["modes"]["hotpatch"]["steps"]
    ]
    assert hp["matching"] + hp["different"] + hp["refused"] == steps
    for package in report["packages"]:
        for mode in ("hotpatch", "reload"):
            assert package["modes"][mode]["baseline_matches"] is True, (package["package"], mode)


def different_steps(report: dict[str, Any]) -> list[str]:
    return [
        f"{p['package']} {s['from']} -> {s['to']}: {list(s['differences'].items())[:5]}"
        for p in report["packages"]
        for s in p["modes"]["hotpatch"]["steps"]
        if s["verdict"] == "different"
    ]


@pytest.mark.timeout(600)
def test_six_releases_patched_in_place_behave_like_a_restart(tmp_path: Path) -> None:
    report = run_replay(tmp_path, "--packages", "six", "--steps", "2")
    check_complete(report, steps=2)
    assert report["totals"]["hotpatch"]["applied"] == 2
    assert different_steps(report) == []
    # the two peers take turns: each step of one right after the same step of the other, so
    # their latency is measured within seconds of each other (not minutes apart)
    (six,) = report["packages"]
    at = [[s["at"] for s in six["modes"][mode]["steps"]] for mode in ("hotpatch", "reload")]
    assert max(at[0][0], at[1][0]) < min(at[0][1], at[1][1]), at
    # the comparison can tell: importlib.reload of the same releases does not behave like a restart.
    # From 3.12 on, six 1.14's own suite fails 125 tests in a fresh process (stdlib modules it
    # tests, distutils among them, are gone), the failures reload's difference shows up in: there
    # both arms fail alike (seen on 3.12.1 and 3.13.0).
    if sys.version_info < (3, 12):
        assert report["totals"]["reload"]["different"] > 0


@pytest.mark.timeout(600)
def test_cachetools_8_0_0_is_never_applied_but_different(tmp_path: Path) -> None:
    # 7.3.3 -> 8.0.0 is applied and then fails 16 of cachetools' own tests that pass after a
    # restart (engine at 9ed3e5b); it must behave like a restart or be refused
    report = run_replay(tmp_path, "--packages", "cachetools", "--from", "7.3.3", "--steps", "1")
    check_complete(report, steps=1)
    assert different_steps(report) == []


def make_sdist(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            data = b"x = 1\n" if info.isfile() else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "target"),
    [
        ("pkg-1.0/link.py", tarfile.SYMTYPE, "/etc/passwd"),
        ("pkg-1.0/hard.py", tarfile.LNKTYPE, "pkg-1.0/a.py"),
        ("../escaped.py", tarfile.REGTYPE, ""),
        ("/tmp/absolute.py", tarfile.REGTYPE, ""),
    ],
)
def test_a_hostile_sdist_is_refused_before_anything_is_written(
    tmp_path: Path, name: str, kind: bytes, target: str
) -> None:
    bench_replay = load_bench()
    good = tarfile.TarInfo("pkg-1.0/a.py")
    bad = tarfile.TarInfo(name)
    bad.type = kind
    bad.linkname = target
    sdist = make_sdist(tmp_path / "pkg-1.0.tar.gz", [good, bad])
    dest = tmp_path / "out" / "tree"
    with pytest.raises(RuntimeError, match="refusing member"):
        bench_replay.extract(sdist, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.py").exists()


def test_a_step_is_judged_only_on_what_happened() -> None:
    bench_replay = load_bench()
    fresh = {"outcomes": {"t::a": "passed"}, "outcomes_again": {"t::a": "passed", "t::b": "failed"}}
    applied = {"applied": True, "duration_s": 0.01, "files": {}}
    same = {**applied, "outcomes": {"t::a": "passed", "t::b": "failed"}}
    assert bench_replay.judge_step(same, fresh)["verdict"] == "matching"
    other = {**applied, "outcomes": {"t::a": "failed", "t::b": "failed"}}
    verdict = bench_replay.judge_step(other, fresh)
    assert verdict == {"verdict": "different", "differences": {"t::a": ["passed", "failed"]}}
    # no guesses: a step never reached, tests that never finished, or no restart to compare with
    assert bench_replay.judge_step(None, fresh)["verdict"] == "unknown"
    assert bench_replay.judge_step(applied, fresh)["verdict"] == "unknown"
    assert bench_replay.judge_step(same, None)["verdict"] == "unknown"
    refused = {
        "applied": False,
        "duration_s": 0.01,
        "refusal": {"stage": "compatibility", "reason": "class 'Info': its base classes changed"},
    }
    assert bench_replay.judge_step(refused, fresh) == {
        "verdict": "refused",
        "group": "compatibility: class '...': its base classes changed",
    }


@pytest.mark.timeout(300)
def test_the_step_benchmark_measures_both_peers_on_the_same_steps() -> None:
    # bench_step.py: a release step back and forth, patch_many in one process and reload in
    # another; every step must be applied by both (it exits 1 otherwise) and get its ratio.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_step.py"), "six", "1.14.0", "1.15.0"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1.1")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "1.14.0 -> 1.15.0",
        "1.15.0 -> 1.14.0",
        "1.14.0 -> 1.15.0",
        "1.15.0 -> 1.14.0",
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[2:7]]
        patch_ms, parse_ms, reload_ms = map(float, cells[:3])
        ratio, floor = (float(cell.rstrip("x")) for cell in cells[3:])
        assert patch_ms > 0 and reload_ms > 0 and 0 <= parse_ms < patch_ms
        assert ratio == pytest.approx(patch_ms / reload_ms, 0.02)
        assert floor == pytest.approx((reload_ms + parse_ms) / reload_ms, 0.02)
    assert "median ratio" in done.stdout and "floor" in done.stdout
