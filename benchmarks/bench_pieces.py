"""Compiling by the statement (``hotpatch.engine.pieces``) on real releases, against ``compile``.

    .venv/bin/python benchmarks/bench_pieces.py --sdists /tmp/replay_sdists
    .venv/bin/python benchmarks/bench_pieces.py --packages six --repeat 10

``importlib.reload`` is almost all ``compile`` (six: about 10 ms of its 11 ms), and so was the
floor of ``patch_many`` while the candidate was the whole module compiled again. The engine now
compiles each top-level statement apart and takes the previous version's code for statements
whose text did not change (``engine/pieces.py``). This measures it on the replay's real release
steps (``bench_replay.PACKAGES``), for every module a step changed:

- ``whole``: ``compile`` of the new source (what ``reload`` pays);
- ``cold``: ``compile_module`` with no previous pieces (a module's first patch);
- ``warm``: ``compile_module`` from the previous release's pieces (every later patch);
- ``new``: how many statements' text is not in the previous release (what the warm compile
  compiles; more on 3.13, where a moved class is compiled again, or when a statement's context
  changed: an import, the future flags);
- ``exact``: whether every function and class-body code object, in order, equals the whole
  compile's (``==`` on code objects: bytecode, constants, names, line table), and the module
  was compiled by the statement at all (``whole`` when the engine fell back to a whole compile).

The statement index both compiles use is built outside the timing (the engine has it already).
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_replay as replay  # noqa: E402

from hotpatch.engine.compare import nested_codes  # noqa: E402
from hotpatch.engine.pieces import compile_module  # noqa: E402
from hotpatch.engine.statements import StatementIndex, parse  # noqa: E402


def nested(code: types.CodeType) -> list[types.CodeType]:
    """Every function and class-body code object under ``code``, depth first, in order."""
    return list(nested_codes(code))


def first_difference(a: types.CodeType, b: types.CodeType) -> str:
    skip = ("co_lnotab", "co_lines", "co_positions")
    for attr in dir(a):
        if attr.startswith("co_") and attr not in skip and getattr(a, attr) != getattr(b, attr):
            return f"{getattr(a, 'co_qualname', a.co_name)}: {attr}"
    return f"{a.co_name}: ?"


def cpu_ms(fn: functools.partial[object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


def changed_modules(pkg: replay.Package, trees: dict[str, Path]) -> list[tuple[str, str, str, str]]:
    """(step, module file, old text, new text) of every module a release step changed."""
    found = []
    for a, b in zip(pkg.versions, pkg.versions[1:]):
        if a not in trees or b not in trees:
            continue
        old_root, new_root = trees[a] / pkg.src, trees[b] / pkg.src
        for name in pkg.import_names:
            files = sorted((new_root / name).rglob("*.py")) or [new_root / f"{name}.py"]
            for new_file in files:
                old_file = old_root / new_file.relative_to(new_root)
                new_text = new_file.read_text(encoding="utf-8")
                old_text = old_file.read_text(encoding="utf-8") if old_file.exists() else ""
                if new_text != old_text and old_text:
                    rel = str(new_file.relative_to(new_root))
                    found.append((f"{pkg.dist} {a} -> {b}", rel, old_text, new_text))
    return found


def study(pkg: replay.Package, trees: dict[str, Path], repeat: int) -> list[dict]:
    rows = []
    for step, filename, old_text, new_text in changed_modules(pkg, trees):
        old_units = StatementIndex.build(parse(old_text), old_text).units
        units = StatementIndex.build(parse(new_text), new_text).units
        old = compile_module(old_text, filename, old_units, None)
        warm = compile_module(new_text, filename, units, old.pieces)
        whole = compile(new_text, filename, "exec", dont_inherit=True)
        want = nested(whole)
        got = [c for code in warm.codes for c in nested(code)]
        why = "" if got == want else "count differs"
        if got != want:
            bad = [(w, g) for w, g in zip(want, got) if w != g]
            why = first_difference(*bad[0]) if bad else why
        elif warm.pieces is None:
            why = "whole"
        rows.append(
            {
                "step": step,
                "module": filename,
                "statements": len(warm.codes),
                "new": sum(body not in (old.pieces or {}) for body in warm.pieces or {}),
                "whole_ms": cpu_ms(
                    functools.partial(compile, new_text, filename, "exec", dont_inherit=True),
                    repeat,
                ),
                "cold_ms": cpu_ms(
                    functools.partial(compile_module, new_text, filename, units, None), repeat
                ),
                "warm_ms": cpu_ms(
                    functools.partial(compile_module, new_text, filename, units, old.pieces),
                    repeat,
                ),
                "exact": not why,
                "why": why,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", default=",".join(replay.PACKAGES))
    parser.add_argument("--sdists", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hotpatch-pieces-") as work:
        search = [replay.DATA, *(Path(d) for d in args.sdists)]
        for dist in args.packages.split(","):
            pkg = replay.PACKAGES[dist]
            trees = {}
            for version in pkg.versions:
                sdist = replay.find_sdist(pkg, version, search)
                if sdist is not None:
                    trees[version] = replay.extract(sdist, Path(work) / dist / version)
            rows += study(pkg, trees, args.repeat)
    print(f"Python {sys.version.split()[0]}")
    print("| step | module | statements | new | whole ms | cold ms | warm ms | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['module']} | {r['statements']} | {r['new']} | "
            f"{r['whole_ms']:.2f} | {r['cold_ms']:.2f} | {r['warm_ms']:.2f} | "
            f"{'yes' if r['exact'] else 'NO: ' + r['why']} |"
        )
    whole = sum(r["whole_ms"] for r in rows) or 1.0
    cold = sum(r["cold_ms"] for r in rows)
    warm = sum(r["warm_ms"] for r in rows)
    print(
        f"total: whole {whole:.1f} ms, cold {cold:.1f} ms ({cold / whole:.2f}x), "
        f"warm {warm:.1f} ms ({warm / whole:.2f}x); "
        f"exact {sum(r['exact'] for r in rows)}/{len(rows)} modules"
    )
    return rows


if __name__ == "__main__":
    main()
