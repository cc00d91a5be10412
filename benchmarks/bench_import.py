"""What having hotpatch installed costs: ``import hotpatch``, and the pytest plugin.

Run from the repository root::

    .venv/bin/python benchmarks/bench_import.py              # about one minute
    .venv/bin/python benchmarks/bench_import.py --runs 10    # quicker, noisier
    .venv/bin/python benchmarks/bench_import.py --src DIR    # measure another copy of hotpatch
                                                             # (e.g. `git archive` of a base commit)

Every figure comes from fresh interpreters, with bytecode caches as an installed package has them
(written once by a warm-up run into a temporary ``PYTHONPYCACHEPREFIX``, so the repository is
left alone and a ``PYTHONDONTWRITEBYTECODE`` environment does not turn every import into a
compile), the statements of one round interleaved so
that load on the machine hits them alike, and the median over ``--runs`` rounds is reported.

1. Import time, measured inside each fresh interpreter with ``time.perf_counter`` around the
   statement: ``import hotpatch``; ``from hotpatch import patch`` (what a program that patches
   pays); and the standard-library modules that ``patch`` truly needs, imported alone. That last
   list is computed, not typed: the stdlib modules imported directly by the hotpatch modules that
   ``from hotpatch import patch`` loads (read from their source), so it follows the code.
   Modules loaded are counted too, and ``-X importtime`` gives the heaviest modules of
   ``from hotpatch import patch``.
2. The pytest plugin: wall time of a trivial pytest run (one passing test in a temporary
   directory) with the plugin (as installed: the ``pytest11`` entry point) and without it
   (``-p no:hotpatch``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMED = """
import sys, time
before = set(sys.modules)
t0 = time.perf_counter()
{statement}
t1 = time.perf_counter()
print(t1 - t0, len(set(sys.modules) - before))
"""


def fresh_env(src: Path | None, pycache: Path) -> dict[str, str]:
    """Bytecode cached in ``pycache`` (written by a warm-up run), as an installed package has it."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def run_python(code: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *extra, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
        cwd=tempfile.gettempdir(),
    )


def timed(statement: str, env: dict[str, str]) -> tuple[float, int]:
    seconds, count = run_python(TIMED.format(statement=statement), env).stdout.split()
    return float(seconds), int(count)


def needed_stdlib(env: dict[str, str]) -> list[str]:
    """Stdlib modules imported directly by the hotpatch modules that ``patch`` loads."""
    code = (
        "import sys, json; from hotpatch import patch; "
        "print(json.dumps({n: m.__file__ for n, m in sys.modules.items() "
        "if n.split('.')[0] == 'hotpatch' and getattr(m, '__file__', None)}))"
    )
    files = json.loads(run_python(code, env).stdout)
    wanted: set[str] = set()
    for path in files.values():
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                wanted.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted.add(node.module)
    stdlib = set(sys.stdlib_module_names)
    return sorted(name for name in wanted if name.split(".")[0] in stdlib and name != "__future__")


def heaviest(statement: str, env: dict[str, str], count: int) -> list[tuple[int, str]]:
    """``-X importtime``: the modules with the largest self time (microseconds)."""
    err = run_python(statement, env, "-X", "importtime").stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_part, _cumulative, name = line.split("|")
        rows.append((int(self_part.split(":")[1]), name.strip()))
    return sorted(rows, reverse=True)[:count]


def pytest_run(directory: Path, env: dict[str, str], *extra: str) -> float:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(directory)]
    t0 = time.perf_counter()
    subprocess.run(args, capture_output=True, env=env, timeout=120, check=True, cwd=directory)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds (default 30)")
    parser.add_argument("--src", type=Path, help="a directory holding another hotpatch package")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-pycache-") as pycache:
        return measure(args.runs, fresh_env(args.src, Path(pycache)))


def measure(rounds: int, env: dict[str, str]) -> int:
    origin = run_python("import hotpatch; print(hotpatch.__file__)", env).stdout.strip()
    print(f"hotpatch from {origin}; Python {sys.version.split()[0]}; {rounds} rounds")

    stdlib = needed_stdlib(env)  # also the warm-up: every module involved is now cached
    statements = {
        "import hotpatch": "import hotpatch",
        "from hotpatch import patch": "from hotpatch import patch",
        "stdlib that patch needs": f"import {', '.join(stdlib)}",
    }
    print(f"\nstdlib modules `patch` needs ({len(stdlib)}): {', '.join(stdlib)}")
    samples: dict[str, list[float]] = {name: [] for name in statements}
    counts: dict[str, int] = {}
    for _ in range(rounds):
        for name, statement in statements.items():
            seconds, counts[name] = timed(statement, env)
            samples[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["stdlib that patch needs"]
    print("\n| statement | median ms | modules loaded | vs stdlib |")
    print("| --- | --- | --- | --- |")
    for name, value in medians.items():
        print(f"| `{name}` | {value * 1000:.1f} | {counts[name]} | {value / base:.2f}x |")

    print("\nheaviest modules of `from hotpatch import patch` (-X importtime, self time, one run):")
    for self_us, name in heaviest("from hotpatch import patch", env, 8):
        print(f"  {self_us / 1000:6.2f} ms  {name}")

    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        directory = Path(tmp)
        (directory / "test_trivial.py").write_text("def test_one():\n    assert True\n")
        (directory / "pytest.ini").write_text("[pytest]\n")
        pytest_run(directory, env)  # warm-up: cache pytest's and the plugin's bytecode
        runs: dict[str, list[float]] = {"with the plugin": [], "-p no:hotpatch": []}
        for _ in range(rounds):
            runs["with the plugin"].append(pytest_run(directory, env))
            runs["-p no:hotpatch"].append(pytest_run(directory, env, "-p", "no:hotpatch"))
    with_plugin = statistics.median(runs["with the plugin"])
    without = statistics.median(runs["-p no:hotpatch"])
    print("\n| trivial pytest run | median ms |")
    print("| --- | --- |")
    print(f"| with the hotpatch plugin | {with_plugin * 1000:.0f} |")
    print(f"| `-p no:hotpatch` | {without * 1000:.0f} |")
    print(f"| plugin's share | {(with_plugin - without) / without * 100:+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
