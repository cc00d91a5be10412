"""Replay real releases of real packages into one live process: does a patch behave like a restart?

Run from the repository root::

    .venv/bin/python benchmarks/bench_replay.py                     # every package, 10 to 30 min
    .venv/bin/python benchmarks/bench_replay.py --packages six,cachetools --steps 2
    .venv/bin/python benchmarks/bench_replay.py --offline --json out.json   # committed sdists only
    .venv/bin/python benchmarks/bench_replay.py --combine run1.json run2.json run3.json

The idea: hotpatch promises that a patched process is indistinguishable from one restarted on the
new code, or the patch is refused. Synthetic edits cannot show that on the changes people really
make, so this benchmark takes consecutive released versions of small pure-Python packages from
PyPI (their sdists ship their tests), replays them into one long-running process and runs each
package's own test suite there after every step, comparing the outcome of every test id with a
fresh process on the same release. ``importlib.reload`` of every module of the package (in
dependency order) goes through the same steps in a second long-running process, side by side:
the two take turns step by step (``run_lockstep``), so that both peers' time for a step is
measured seconds apart.

The problem: a long replay must not touch anything outside its own temporary directory, and a
release whose tests hang must not hang the benchmark. The mechanism: every sdist is extracted
(no links, no paths outside the target) into a private temporary directory; each fresh run and
each replay is a subprocess of ``_replay_worker.py`` in its own session with a deadline, killed
as a process group when it passes (the steps it did not finish count as "unknown", never as a
guess); each test has a 60 s limit (pytest-timeout). Sdists come from ``benchmarks/replay_data/``
(committed, for CI), then ``--sdists DIR``, then ``pip download --no-deps --no-binary :all:``
unless ``--offline``.

Per step and mode the outcome is one of: applied and matching a restart, applied but different
(the defect: hotpatch said success and the process behaves differently), refused (grouped by
stage and reason), or unknown (a run was killed or crashed). The patch latency is compared with
``importlib.reload`` on the steps both applied (median ratio); one run is one sample per step,
and ``--combine`` takes several runs' ``--json`` reports together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "_replay_worker.py"
DATA = HERE / "replay_data"
MODES = ("hotpatch", "reload")


@dataclass(frozen=True)
class Package:
    """A package to replay: where its code and tests are in the sdist, and which releases."""

    dist: str  # the name on PyPI
    stem: str  # the sdist file name stem: ``more_itertools`` in ``more_itertools-11.2.1.tar.gz``
    import_names: tuple[str, ...]
    src: str  # the folder holding the import packages inside the sdist ("" for the top)
    tests: tuple[str, ...]
    versions: tuple[str, ...]  # consecutive releases, oldest first
    license: str
    deselect: tuple[str, ...] = ()  # slow tests left out of every run (fresh and replay alike)
    note: str = ""


PACKAGES: dict[str, Package] = {
    p.dist: p
    for p in (
        Package(
            "six",
            "six",
            ("six",),
            "",
            ("test_six.py",),
            ("1.14.0", "1.15.0", "1.16.0", "1.17.0"),
            "MIT",
        ),
        Package(
            "cachetools",
            "cachetools",
            ("cachetools",),
            "src",
            ("tests",),
            ("7.3.1", "7.3.2", "7.3.3", "8.0.0", "8.0.1", "8.0.2"),
            "MIT",
        ),
        Package(
            "toolz",
            "toolz",
            ("toolz", "tlz"),
            "",
            ("toolz",),
            ("0.12.1", "1.0.0", "1.1.0", "1.2.0"),
            "BSD-3-Clause",
        ),
        Package(
            "idna",
            "idna",
            ("idna",),
            "",
            ("tests",),
            ("3.17", "3.18", "3.19", "3.20"),
            "BSD-3-Clause",
            deselect=("tests/test_idna_concurrency.py",),
            note="test_idna_properties.py needs hypothesis (not installed): a collection error "
            "in every run alike",
        ),
        Package(
            "more-itertools",
            "more_itertools",
            ("more_itertools",),
            "",
            ("tests",),
            ("10.8.0", "11.0.0", "11.0.1", "11.0.2", "11.1.0", "11.2.1"),
            "MIT",
            deselect=(
                "tests/test_recipes.py::PrimeFunctionTests::test_primes",
                "tests/test_recipes.py::PrimeFunctionTests::test_nth_prime_approximate",
                "tests/test_recipes.py::PolynomialFromRootsTests::test_large",
                "tests/test_recipes.py::RunningMedianTests::test_vs_statistics_median",
                "tests/test_more.py::DiscreteFourierTransformTests::test_roundtrip",
                "tests/test_more.py::TestConcurrentTee::test_concurrent_consumers",
                "tests/test_more.py::TestSerialize::test_concurrent_calls",
                "tests/test_more.py::ExtractTests::test_all_orderings",
            ),
            note="11.2.0 is skipped: its sdist ships no tests",
        ),
    )
}


# -- getting and unpacking the sdists --------------------------------------------------------------
def find_sdist(pkg: Package, version: str, dirs: list[Path]) -> Path | None:
    name = f"{pkg.stem}-{version}.tar.gz"
    for folder in dirs:
        candidate = folder / name
        if candidate.is_file() and not candidate.is_symlink():
            return candidate
    return None


def download_sdist(pkg: Package, version: str, dest: Path, *, timeout_s: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    cmd += ["-d", str(dest), f"{pkg.dist}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    found = find_sdist(pkg, version, [dest])
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pip download {pkg.dist}=={version} failed:\n{done.stderr[-2000:]}")
    return found


def extract(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` under ``dest``; refuse links, devices and paths that leave ``dest``."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or not str(target).startswith(str(dest.resolve())):
                raise RuntimeError(f"{sdist.name}: refusing member {m.name!r} ({m.type!r})")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python 3.10 before 3.10.12: members were checked above
            tar.extractall(dest, members=members)
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise RuntimeError(f"{sdist.name}: expected one top folder, found {len(tops)}")
    return tops[0]


# -- running the worker ----------------------------------------------------------------------------
ENGINE_SRC: list[str] = []  # --engine-src: another copy of hotpatch for the workers (a base commit)


def _start_worker(
    plan: dict[str, Any], work: Path, label: str, *, stdin: int
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``_replay_worker.py`` started on ``plan`` in its own session: (process, its results file,
    its log file)."""
    plan_file = work / f"{label}.plan.json"
    results = work / f"{label}.results.jsonl"
    log_file = work / f"{label}.log"
    plan_file.write_text(json.dumps(plan), "utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONHASHSEED"] = "0"  # same hash order in fresh and replay processes
    if ENGINE_SRC:
        env["PYTHONPATH"] = ENGINE_SRC[0]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(plan_file), str(results)],
            cwd=work,
            env=env,
            stdin=stdin,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, results, log_file


def run_worker(plan: dict[str, Any], work: Path, label: str, *, timeout_s: float) -> dict[str, Any]:
    """Run ``_replay_worker.py`` on ``plan`` in its own session; kill its group at the deadline."""
    started = time.monotonic()
    proc, results, log_file = _start_worker(plan, work, label, stdin=subprocess.DEVNULL)
    killed = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        killed = True
        _kill_group(proc)
    return _run_result(proc, results, log_file, killed=killed, started=started)


def _run_result(
    proc: subprocess.Popen[bytes], results: Path, log_file: Path, *, killed: bool, started: float
) -> dict[str, Any]:
    """What a worker's run came to: its records, how it ended, its log's end if it failed."""
    tail = log_file.read_text("utf-8", "replace")[-3000:]
    return {
        "records": _records(results),
        "returncode": proc.returncode,
        "killed": killed,
        "elapsed_s": time.monotonic() - started,
        "log_tail": tail if (killed or proc.returncode != 0) else "",
    }


def run_lockstep(
    plans: dict[str, dict[str, Any]], work: Path, label: str, *, steps: int, timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Run one worker per mode side by side, each step of one right after the same step of the
    other, so that both peers' latency of a step is measured within seconds of each other.

    On a shared machine CPU time itself moves by a third from one minute to the next; the
    chains used to run one after the other, minutes apart, so a step's ratio carried that
    drift. Here each worker waits for a ``go`` line on its standard input before each step
    (after its baseline test run); the modes take turns going first. A worker that dies or
    passes ``timeout_s`` on a step is killed (its group); its later steps are unknown, and the
    other mode goes on alone. Returns, per mode, what ``run_worker`` returns.
    """
    started = time.monotonic()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files: dict[str, tuple[Path, Path]] = {}
    killed = dict.fromkeys(plans, False)
    try:
        for mode, plan in plans.items():
            procs[mode], results, log_file = _start_worker(
                {**plan, "lockstep": True}, work, f"{label}-{mode}", stdin=subprocess.PIPE
            )
            files[mode] = (results, log_file)
        for step in range(steps + 1):
            order = list(plans) if step % 2 else list(reversed(plans))
            for mode in order:
                proc = procs[mode]
                if killed[mode] or proc.poll() is not None:
                    continue
                if step:  # step 0 is the baseline test run, made unasked
                    try:
                        assert proc.stdin is not None
                        proc.stdin.write(b"go\n")
                        proc.stdin.flush()
                    except (BrokenPipeError, OSError):
                        continue  # it ended: its records say how far it got
                if not _await_record(proc, files[mode][0], step, timeout_s):
                    killed[mode] = proc.poll() is None
                    _kill_group(proc)
    finally:
        for mode, proc in procs.items():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                killed[mode] = True
                _kill_group(proc)
    return {
        mode: _run_result(proc, *files[mode], killed=killed[mode], started=started)
        for mode, proc in procs.items()
    }


def _records(results: Path) -> list[dict[str, Any]]:
    """The records a worker wrote whole (a line it is still writing, or was killed writing, is
    left out: only lines that end in a newline)."""
    if not results.exists():
        return []
    lines = results.read_text("utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _await_record(
    proc: subprocess.Popen[bytes], results: Path, step: int, timeout_s: float
) -> bool:
    """Whether the worker wrote step ``step``'s record (or ended) before the deadline.

    Polled by the file's size (a record is one line, which can hold thousands of test outcomes:
    not parsed again until the file grows, so the poll costs the worker beside it nothing)."""
    deadline = time.monotonic() + timeout_s
    seen = -1
    while time.monotonic() < deadline:
        size = results.stat().st_size if results.exists() else 0
        if size != seen:
            seen = size
            if any(r.get("step") == step for r in _records(results)):
                return True
        if proc.poll() is not None:
            return True  # ended (crashed): what it wrote is what there is
        time.sleep(0.05)
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# -- comparing ---------------------------------------------------------------------------------------
def differences(fresh: dict[str, str], live: dict[str, str]) -> dict[str, list[str]]:
    """Test id -> [fresh outcome, live outcome] where they differ (a missing id is ``absent``)."""
    return {
        nodeid: [fresh.get(nodeid, "absent"), live.get(nodeid, "absent")]
        for nodeid in sorted(set(fresh) | set(live))
        if fresh.get(nodeid) != live.get(nodeid)
    }


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBERS = re.compile(r"\b\d+\b")


def reason_class(stage: str, reason: str) -> str:
    """A refusal's group: its stage and its reason with names and numbers blanked out."""
    text = _NUMBERS.sub("N", _QUOTED.sub("'...'", reason.splitlines()[0] if reason else ""))
    return f"{stage}: {text[:110]}"


def judge_step(record: dict[str, Any] | None, fresh: dict[str, Any] | None) -> dict[str, Any]:
    """The verdict of one step in one mode: matching, different, refused, failed or unknown."""
    if record is None:
        return {
            "verdict": "unknown",
            "why": "the replay did not reach this step (killed or crashed)",
        }
    if not record["applied"]:
        if "refusal" in record:
            r = record["refusal"]
            return {"verdict": "refused", "group": reason_class(r["stage"], r["reason"])}
        if "failure" in record:  # importlib.reload raised
            err = record["failure"]["error"]
            return {"verdict": "failed", "group": reason_class("reload", err)}
        return {"verdict": "error", "group": reason_class("engine raised", record.get("error", ""))}
    if "outcomes" not in record:
        return {"verdict": "unknown", "why": "the tests did not finish"}
    if fresh is None or "outcomes" not in fresh:
        return {"verdict": "unknown", "why": "the fresh run of this release did not finish"}
    # a replayed process has run the suite before: compare with a fresh process's second run
    diff = differences(fresh["outcomes_again"], record["outcomes"])
    if diff:
        return {"verdict": "different", "differences": diff}
    return {"verdict": "matching"}


# -- one package -------------------------------------------------------------------------------------
def replay_package(
    pkg: Package, versions: list[str], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    print(f"[{pkg.dist}] releases {', '.join(versions)}", flush=True)
    search = [DATA, *(Path(d) for d in args.sdists)]
    downloads = work / "downloads"
    downloads.mkdir(exist_ok=True)
    trees: list[dict[str, str]] = []
    for version in versions:
        sdist = find_sdist(pkg, version, [*search, downloads])
        if sdist is None:
            if args.offline:
                raise SystemExit(f"{pkg.stem}-{version}.tar.gz not found in {search} (--offline)")
            sdist = download_sdist(pkg, version, downloads, timeout_s=args.download_timeout)
        tree = extract(sdist, work / "trees" / f"{pkg.stem}-{version}")
        trees.append({"version": version, "tree": str(tree), "sdist": sdist.name})
    base_plan = {
        "src": pkg.src,
        "import_names": list(pkg.import_names),
        "tests": list(pkg.tests),
        "deselect": list(pkg.deselect),
        "test_timeout_s": args.test_timeout,
        "allow_removals": not args.refuse_removals,
    }
    fresh: dict[str, dict[str, Any]] = {}
    for t in trees:
        plan = {**base_plan, "mode": "fresh", "versions": [t]}
        label = f"{pkg.stem}-{t['version']}-fresh"
        run = run_worker(plan, work, label, timeout_s=args.run_timeout)
        if not run["records"]:
            why = f"killed at its {args.run_timeout:g} s deadline" if run["killed"] else "crashed"
            print(f"  fresh {t['version']}: no result ({why})\n{run['log_tail']}", flush=True)
            continue
        record = fresh[t["version"]] = run["records"][0]
        unrepeatable = differences(record["outcomes"], record["outcomes_again"])
        print(
            f"  fresh {t['version']}: {_summary(record)}; {len(unrepeatable)} tests differ on a "
            "second run in the same process",
            flush=True,
        )
    modes: dict[str, Any] = {}
    runs = run_lockstep(
        {
            mode: {
                **base_plan,
                "mode": mode,
                "versions": trees,
                "live": str(work / f"live-{pkg.stem}-{mode}"),
            }
            for mode in MODES
        },
        work,
        pkg.stem,
        steps=len(trees) - 1,
        timeout_s=args.run_timeout,
    )
    for mode in MODES:
        run = runs[mode]
        by_step = {r["step"]: r for r in run["records"]}
        baseline = by_step.get(0)
        steps = []
        for i, t in enumerate(trees[1:], start=1):
            record = by_step.get(i)
            verdict = judge_step(record, fresh.get(t["version"]))
            step = {
                "step": i,
                "from": trees[i - 1]["version"],
                "to": t["version"],
                **verdict,
            }
            if record is not None:
                step["duration_s"] = record["duration_s"]
                for key in ("cpu_s", "track_cpu_s", "at"):
                    if key in record:
                        step[key] = record[key]
                step["files"] = record["files"]
                step["patched"] = record.get("patched", [])
                for key in ("refusal", "failure", "error", "traceback"):
                    if key in record:
                        step[key] = record[key]
            steps.append(step)
            print(f"  {mode:8} {step['from']} -> {step['to']}: {_verdict_line(step)}", flush=True)
        base_diff = None
        if baseline is not None and trees[0]["version"] in fresh:
            base_diff = differences(fresh[trees[0]["version"]]["outcomes"], baseline["outcomes"])
        modes[mode] = {
            "steps": steps,
            "baseline_matches": None if base_diff is None else not base_diff,
            "baseline_differences": base_diff or {},
            "killed": run["killed"],
            "returncode": run["returncode"],
            "log_tail": run["log_tail"],
        }
        if run["killed"] or run["returncode"] != 0:
            print(f"  {mode}: replay ended early (killed={run['killed']}, rc={run['returncode']})")
            print(run["log_tail"])
    return {
        "package": pkg.dist,
        "license": pkg.license,
        "versions": versions,
        "note": pkg.note,
        "deselected": list(pkg.deselect),
        "fresh": {v: _fresh_summary(r) for v, r in fresh.items()},
        "modes": modes,
    }


def _summary(record: dict[str, Any]) -> str:
    counts = Counter(record["outcomes"].values())
    return (
        ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + f" in {record['tests_s']:.1f} s"
    )


def _fresh_summary(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "outcomes": dict(Counter(record["outcomes"].values())),
        "tests_s": record["tests_s"],
        # tests whose outcome changes when the suite runs a second time in the same process
        "unrepeatable": differences(record["outcomes"], record["outcomes_again"]),
    }


def _verdict_line(step: dict[str, Any]) -> str:
    v = step["verdict"]
    if v == "different":
        diff = step["differences"]
        first = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(diff.items())[:3])
        return f"APPLIED BUT DIFFERENT ({len(diff)} tests: {first})"
    if v in ("refused", "failed", "error"):
        detail = step.get("refusal") or step.get("failure") or {"reason": step.get("error", "")}
        text = str(detail.get("reason") or detail.get("error") or "").splitlines()[0][:160]
        where = detail.get("module", "")
        return f"{v} ({where}: {step.get('refusal', {}).get('stage', '')} {text})"
    if v == "unknown":
        return f"unknown ({step['why']})"
    return f"matching a restart ({step['duration_s'] * 1000:.1f} ms)"


# -- the report --------------------------------------------------------------------------------------
def tally(steps: list[dict[str, Any]]) -> dict[str, Any]:
    verdicts = Counter(s["verdict"] for s in steps)
    applied = (
        verdicts["matching"]
        + verdicts["different"]
        + sum(
            1 for s in steps if s["verdict"] == "unknown" and "duration_s" in s and "group" not in s
        )
    )
    return {
        "steps": len(steps),
        "applied": applied,
        "refused": verdicts["refused"] + verdicts["failed"],
        "errors": verdicts["error"],
        "matching": verdicts["matching"],
        "different": verdicts["different"],
        "unknown": verdicts["unknown"],
        "groups": dict(Counter(s["group"] for s in steps if "group" in s)),
    }


def _both_applied(
    pkg_results: list[dict[str, Any]],
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(package, hotpatch step, reload step) of every step both peers applied."""
    applied = ("matching", "different")
    return [
        (res["package"], a, b)
        for res in pkg_results
        for a, b in zip(res["modes"]["hotpatch"]["steps"], res["modes"]["reload"]["steps"])
        if a["verdict"] in applied and b["verdict"] in applied
    ]


def latency(pkg_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Patch vs reload time on the steps both applied: medians and the median of per-step ratios.

    CPU time (``time.process_time``) of the ``patch_many`` call and of the reloads of the same
    step is the figure: the two peers run in different processes at different moments, and CPU
    time is far less disturbed than wall time by other work on a shared machine (wall time is
    kept for reference). The first step of a package is the first patch (and the first reload)
    in its process, which pays one-time work; it is reported apart from the later steps, and
    with everything together. ``track_ms``: the CPU time of the ``track()`` calls made before
    the steps (where the engine builds its index of loaded modules, ahead of the first patch).
    """
    pairs = [(a, b) for _, a, b in _both_applied(pkg_results)]
    if not pairs:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(pairs)}
    subsets = {
        "": pairs,
        "first_": [(a, b) for a, b in pairs if a["step"] == 1],
        "later_": [(a, b) for a, b in pairs if a["step"] > 1],
    }
    for prefix, subset in subsets.items():
        out[f"{prefix}n"] = len(subset)
        for key, label in (("duration_s", "wall"), ("cpu_s", "cpu")):
            if subset and all(key in a and key in b for a, b in subset):
                name = f"{prefix}{label}"
                out[f"{name}_patch_median_ms"] = statistics.median(a[key] for a, _ in subset) * 1e3
                out[f"{name}_reload_median_ms"] = statistics.median(b[key] for _, b in subset) * 1e3
                out[f"{name}_median_ratio"] = statistics.median(a[key] / b[key] for a, b in subset)
    tracks = [a["track_cpu_s"] for res in pkg_results for a in res["modes"]["hotpatch"]["steps"]]
    tracks = [t for t in tracks if isinstance(t, float)]
    if tracks:
        out["track_first_ms"] = statistics.median(
            a["track_cpu_s"] * 1e3
            for res in pkg_results
            for a in res["modes"]["hotpatch"]["steps"][:1]
            if "track_cpu_s" in a
        )
        out["track_later_ms"] = (
            statistics.median(
                a["track_cpu_s"] * 1e3
                for res in pkg_results
                for a in res["modes"]["hotpatch"]["steps"][1:]
                if "track_cpu_s" in a
            )
            if any(
                "track_cpu_s" in a for r in pkg_results for a in r["modes"]["hotpatch"]["steps"][1:]
            )
            else None
        )
    return out


def combined_latency(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency of several runs taken together: per step, the median over the runs of its
    ``patch_many`` / ``reload`` CPU ratio (only steps both applied in every run), and the
    median of those; and per step the ratio of each peer's fastest run (noise on a shared
    machine only adds time). One run gives one sample per step, and on a shared machine a
    step's ratio moves by a third or more between runs.
    """
    cpu: dict[tuple[str, int, str, str], list[tuple[float, float]]] = {}
    for report in reports:
        for package, a, b in _both_applied(report["packages"]):
            if "cpu_s" in a and "cpu_s" in b and b["cpu_s"] > 0:
                key = (package, a["step"], a["from"], a["to"])
                cpu.setdefault(key, []).append((a["cpu_s"], b["cpu_s"]))
    steps = [
        {
            "package": pkg,
            "step": step,
            "from": old,
            "to": new,
            "ratios": (ratios := [p / r for p, r in pairs]),
            "median": statistics.median(ratios),
            # noise on a shared machine only adds time: each peer's fastest run, compared
            "of_minima": min(p for p, _ in pairs) / min(r for _, r in pairs),
        }
        for (pkg, step, old, new), pairs in cpu.items()
        if len(pairs) == len(reports)
    ]
    out: dict[str, Any] = {"runs": len(reports), "steps": steps}
    if steps:
        out["median_ratio"] = statistics.median(s["median"] for s in steps)
        out["median_of_minima"] = statistics.median(s["of_minima"] for s in steps)
    return out


def print_combined(combined: dict[str, Any]) -> None:
    print(f"patch_many / reload, CPU, {combined['runs']} runs")
    print("| step | ratio in each run | median | fastest / fastest |\n|---|---|---|---|")
    for s in combined["steps"]:
        each = ", ".join(f"{r:.2f}" for r in s["ratios"])
        print(
            f"| {s['package']} {s['from']} -> {s['to']} | {each} | {s['median']:.2f}x "
            f"| {s['of_minima']:.2f}x |"
        )
    if "median_ratio" in combined:
        print(
            f"median over the steps of each step's median ratio: {combined['median_ratio']:.2f}x; "
            f"of each step's fastest patch / fastest reload: {combined['median_of_minima']:.2f}x"
        )


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for res in report["packages"]:
        t = {m: tally(res["modes"][m]["steps"]) for m in MODES}
        lat = latency([res])
        rows.append((res["package"], t, lat, res))
    total = {
        m: tally([s for r in report["packages"] for s in r["modes"][m]["steps"]]) for m in MODES
    }
    lat_total = latency(report["packages"])
    print()
    print(
        "| package | steps | hotpatch applied | refused | matching | **applied but different** | unknown "
        "| reload applied | failed | matching | applied but different | unknown | patch / reload, median per step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def row(name: str, t: dict[str, Any], lat: dict[str, Any]) -> str:
        h, r = t["hotpatch"], t["reload"]
        ratio = "-"
        if lat.get("n"):
            ratio = f"wall {lat['wall_median_ratio']:.2f}x"
            if "cpu_median_ratio" in lat:
                ratio = f"CPU {lat['cpu_median_ratio']:.2f}x ({ratio})"
        return (
            f"| {name} | {h['steps']} | {h['applied']} | {h['refused'] + h['errors']} | {h['matching']} "
            f"| **{h['different']}** | {h['unknown']} | {r['applied']} | {r['refused']} "
            f"| {r['matching']} | {r['different']} | {r['unknown']} | {ratio} |"
        )

    for name, t, lat, _ in rows:
        print(row(name, t, lat))
    print(row("**total**", total, lat_total))
    print()
    h, r = total["hotpatch"], total["reload"]
    n = h["steps"]
    if n:
        print(
            f"hotpatch: {h['applied']}/{n} applied, {h['matching']}/{n} matching a restart, "
            f"{h['different']} applied but different, {h['refused']} refused, {h['errors']} engine errors, "
            f"{h['unknown']} unknown"
        )
        print(
            f"importlib.reload: {r['applied']}/{n} ran without raising, {r['matching']}/{n} matching a "
            f"restart, {r['different']} different, {r['refused']} raised, {r['unknown']} unknown"
        )
    for prefix, what in (
        ("", "all steps both applied"),
        ("first_", "first step of each package (the first patch in its process)"),
        ("later_", "later steps"),
    ):
        for label in ("cpu", "wall"):
            name = f"{prefix}{label}"
            if f"{name}_median_ratio" in lat_total:
                print(
                    f"latency ({label} time), {what}, n={lat_total[f'{prefix}n']}: patch_many "
                    f"median {lat_total[f'{name}_patch_median_ms']:.1f} ms, reload median "
                    f"{lat_total[f'{name}_reload_median_ms']:.1f} ms, median per-step ratio "
                    f"{lat_total[f'{name}_median_ratio']:.2f}x"
                )
    if lat_total.get("track_first_ms") is not None:
        later = lat_total.get("track_later_ms")
        print(
            f"track() before the first step (builds the engine's module index): median "
            f"{lat_total['track_first_ms']:.1f} ms CPU"
            + (f"; before later steps {later:.1f} ms" if later is not None else "")
        )
    groups = Counter()
    for res in report["packages"]:
        for m in MODES:
            for s in res["modes"][m]["steps"]:
                if "group" in s:
                    groups[(m, res["package"], s["group"])] += 1
    if groups:
        print("\nrefusals and failures, by reason:")
        for (m, pkg, g), count in sorted(groups.items()):
            print(f"  {m:8} {pkg:15} {count} x {g}")
    print("\nsteps applied but different (first 3 test ids each):")
    any_diff = False
    for res in report["packages"]:
        for m in MODES:
            for s in res["modes"][m]["steps"]:
                if s["verdict"] == "different":
                    any_diff = True
                    print(
                        f"  {m:8} {res['package']} {s['from']} -> {s['to']}: {len(s['differences'])} tests"
                    )
                    for k, (a, b) in list(s["differences"].items())[:3]:
                        print(f"      {k}: restart {a}, live {b}")
    if not any_diff:
        print("  none")
    for res in report["packages"]:
        for m in MODES:
            if res["modes"][m]["baseline_matches"] is False:
                print(
                    f"\nNOTE {res['package']} {m}: step 0 (no patch yet) already differs from a fresh "
                    f"run: {list(res['modes'][m]['baseline_differences'].items())[:3]}"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--packages",
        default=",".join(PACKAGES),
        help="comma-separated, from: " + ", ".join(PACKAGES),
    )
    parser.add_argument(
        "--from", dest="start", default=None, help="start at this release (one package only)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="replay only the first N steps of each package"
    )
    parser.add_argument(
        "--sdists", action="append", default=[], help="another folder of sdists to look in"
    )
    parser.add_argument(
        "--offline", action="store_true", help="never download; use the folders only"
    )
    parser.add_argument(
        "--json", default=None, help="write the full report as JSON to this file ('-': stdout)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (its path is printed)"
    )
    parser.add_argument(
        "--refuse-removals", action="store_true", help="patch without allow_removals"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="deadline per release run, s"
    )
    parser.add_argument("--test-timeout", type=float, default=60.0, help="deadline per test, s")
    parser.add_argument(
        "--engine-src",
        help="directory holding another copy of the hotpatch package (e.g. a `git archive` of a "
        "base commit), imported by the workers instead of this one: before/after figures",
    )
    parser.add_argument("--download-timeout", type=float, default=600.0)
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="replay nothing: read the --json reports of several runs and print each step's "
        "median latency ratio over them",
    )
    args = parser.parse_args(argv)
    if args.combine:
        print_combined(
            combined_latency([json.loads(Path(f).read_text("utf-8")) for f in args.combine])
        )
        return 0
    if args.engine_src:
        src = Path(args.engine_src).resolve()
        if not (src / "hotpatch" / "__init__.py").is_file():
            parser.error(f"--engine-src {src}: no hotpatch/__init__.py there")
        ENGINE_SRC[:] = [str(src)]
    names = [n.strip() for n in args.packages.split(",") if n.strip()]
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        parser.error(f"unknown package(s) {unknown}; known: {', '.join(PACKAGES)}")
    if args.start is not None and (
        len(names) != 1 or args.start not in PACKAGES[names[0]].versions
    ):
        parser.error(
            f"--from needs one package and one of its releases, got {names} {args.start!r}"
        )
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="hotpatch-replay-"))  # private: mode 0700, ours
    try:
        report: dict[str, Any] = {
            "commit": _commit(),
            "python": platform.python_version(),
            "allow_removals": not args.refuse_removals,
            "packages": [],
        }
        for name in names:
            pkg = PACKAGES[name]
            versions = list(pkg.versions)
            if args.start is not None:
                versions = versions[versions.index(args.start) :]
            if args.steps is not None:
                versions = versions[: args.steps + 1]
            pkg_work = work / pkg.stem
            pkg_work.mkdir()
            report["packages"].append(replay_package(pkg, versions, pkg_work, args))
        report["elapsed_s"] = time.monotonic() - started
        report["totals"] = {
            m: tally([s for r in report["packages"] for s in r["modes"][m]["steps"]]) for m in MODES
        }
        report["latency"] = latency(report["packages"])
        print_report(report)
        print(
            f"\n{report['elapsed_s']:.0f} s, Python {report['python']}, hotpatch at {report['commit']}"
        )
        if args.json == "-":
            print(json.dumps(report, indent=1))
        elif args.json:
            Path(args.json).write_text(json.dumps(report, indent=1), "utf-8")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
