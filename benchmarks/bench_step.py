"""One replay step, back and forth in one process: ``patch_many`` against ``importlib.reload``.

    .venv/bin/python benchmarks/bench_step.py idna 3.18 3.19 --sdists /tmp/replay_sdists --tests
    .venv/bin/python benchmarks/bench_step.py cachetools 8.0.1 8.0.2 --rounds 3 --profile 2

Where ``bench_replay.py`` judges fidelity over whole release chains, this measures the latency of
one step where it can be seen: a live copy of release A is imported (and, with ``--tests``, its
test suite run once, so that the process holds what the replay's does: a large heap), then
releases B, A, B, ... are written over it and applied, each timed in CPU (``time.process_time``).
The same sequence runs in a second process with ``importlib.reload`` of every module of the
package in dependency order; both processes run one after the other in this run, and the ratio
of each step is printed. ``--profile K`` prints a cProfile of the engine's step K (0-based).

The sdists come from ``--sdists`` folders or the committed ``replay_data/`` (``bench_replay.py``
downloads them); everything is unpacked in a private temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _replay_worker as worker  # noqa: E402
import bench_replay as replay  # noqa: E402


def run_mode(args: argparse.Namespace) -> list[list[float]]:
    """The worker: import release A, apply B, A, B... with ``args.mode``; per step the CPU
    seconds of the whole step and of its syntax-tree reads (``worker.syntax_tree_reads``)."""
    import structlog

    pkg = replay.PACKAGES[args.package]
    work = Path(tempfile.mkdtemp(prefix="hotpatch-step-"))
    try:
        search = [replay.DATA, *(Path(d) for d in args.sdists)]
        trees = {}
        for version in (args.a, args.b):
            sdist = replay.find_sdist(pkg, version, search)
            if sdist is None:
                raise SystemExit(f"{pkg.stem}-{version}.tar.gz not found in {search}")
            trees[version] = replay.extract(sdist, work / "trees" / version)
        live = work / "live"
        shutil.copytree(trees[args.a], live)
        plan = {
            "src": pkg.src,
            "import_names": list(pkg.import_names),
            "tests": list(pkg.tests),
            "deselect": list(pkg.deselect),
            "test_timeout_s": 60,
            "allow_removals": True,
        }
        with open(os.devnull, "w") as devnull:
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(devnull))
            sys.dont_write_bytecode = True
            worker.start(live, plan)
            if args.tests:
                worker.run_tests(live, plan)
            return _steps(args, pkg, trees, live, plan)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _steps(
    args: argparse.Namespace,
    pkg: replay.Package,
    trees: dict[str, Path],
    live: Path,
    plan: dict[str, object],
) -> list[list[float]]:
    import hotpatch

    src = (live / pkg.src).resolve() if pkg.src else live
    cpu: list[list[float]] = []
    for step, version in enumerate([args.b, args.a] * args.rounds):
        if args.mode == "hotpatch":
            hotpatch.track(*worker.package_modules(src, pkg.import_names))
        worker.write_release(trees[version], live)
        order = worker.modules_in_order(src, list(pkg.import_names))
        apply = worker.apply_hotpatch if args.mode == "hotpatch" else worker.apply_reload
        profile = cProfile.Profile() if step == args.profile and args.mode == "hotpatch" else None
        if profile is not None:
            profile.enable()
        record = apply(order, plan)
        if profile is not None:
            profile.disable()
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats(args.profile_sort).print_stats(40)
            print(out.getvalue(), file=sys.stderr)
        if not record["applied"]:
            why = record.get("refusal") or record.get("failure") or record.get("error")
            raise SystemExit(f"{args.mode}: step {step} ({version}) not applied: {why}")
        cpu.append([record["cpu_s"], record.get("parse_cpu_s", 0.0)])
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", choices=sorted(replay.PACKAGES))
    parser.add_argument("a", help="the release imported first")
    parser.add_argument("b", help="the release it is patched to (and back from)")
    parser.add_argument("--rounds", type=int, default=2, help="B then A, this many times")
    parser.add_argument("--tests", action="store_true", help="run the package's tests once first")
    parser.add_argument("--sdists", action="append", default=[], help="a folder of sdists")
    parser.add_argument("--profile", type=int, default=-1, help="profile the engine's step K")
    parser.add_argument(
        "--profile-sort",
        default="cumulative",
        help="the profile's order (pstats keys: cumulative, tottime...)",
    )
    parser.add_argument(
        "--engine-src", help="a directory holding another copy of hotpatch (a base commit)"
    )
    parser.add_argument("--mode", choices=("hotpatch", "reload"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # the worker
        print(json.dumps(run_mode(args)))
        return 0
    results: dict[str, list[list[float]]] = {}
    for mode in ("hotpatch", "reload"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONHASHSEED"] = "0"
        if args.engine_src:
            env["PYTHONPATH"] = args.engine_src
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        started = time.monotonic()
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=1800, check=False
        )
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        if args.profile >= 0 and mode == "hotpatch":
            print(done.stderr[-12000:], file=sys.stderr)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    steps = [args.b, args.a] * args.rounds
    print(f"{args.package} {args.a} <-> {args.b}, tests loaded: {args.tests} (CPU ms per step)")
    print(
        "| step | patch_many | of which ast.parse | reload | ratio | floor (reload + parse) |\n"
        "|---|---|---|---|---|---|"
    )
    ratios, floors = [], []
    for k, ((patch_s, parse_s), (reload_s, _)) in enumerate(
        zip(results["hotpatch"], results["reload"])
    ):
        ratios.append(patch_s / reload_s)
        floors.append((reload_s + parse_s) / reload_s)
        came_from = args.a if k % 2 == 0 else args.b
        print(
            f"| {came_from} -> {steps[k]} | {patch_s * 1000:.1f} | {parse_s * 1000:.1f} "
            f"| {reload_s * 1000:.1f} | {ratios[-1]:.2f}x | {floors[-1]:.2f}x |"
        )
    later = ratios[1:] or ratios
    print(
        f"median ratio {statistics.median(ratios):.2f}x; after the first step "
        f"{statistics.median(later):.2f}x; floor {statistics.median(floors):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
