"""What a parallel run costs the calls it dispatches (docs/performance.md, "Parallel runs").

The problem: a trial puts a trampoline in every changed function, so every call pays for the
choice of a version, and a shadowed call also pays for handing its arguments to the worker. The
promise is that this is small (<= 1 us per call to a trivial function, shadowed callers within 10%
of unshadowed ones) and that nothing is left once the candidate is promoted (<= 1.05x).

The mechanism: each figure compares a dispatched function with an untouched *twin* (the same
source in another module), timed in alternating rounds in one process, so that the load of a
shared machine hits both alike; the figure is the median over the rounds.

1. Dispatch: ``f(x) -> x`` under a canary at 50% (both arms trivial), outermost calls, no key and
   with a routing key, and nested in a dispatched call (its arm already set); then the same
   function after the promote. Timed in this thread's CPU time.
2. Shadow: a caller of a function doing ~50 us of work, shadowed at ``sample`` 1% and 10%, against
   its twin. Where a shadowed call's time goes: the caller's own CPU (``thread_time``: the dispatch
   and the hand-off to the worker), the worker's CPU (the process's CPU time less the caller's,
   per caller call: the candidate run again, which holds the GIL meanwhile), and the caller's
   wall clock, per round (mean per call) and per call (median and p99 of each call timed alone).

Usage: ``python benchmarks/bench_trials.py [--rounds 31] [--number 100000]``
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import hotpatch
from hotpatch.engine import Engine

TRIVIAL = "def f(x):\n    return x\n"
TRIVIAL_NEW = "\n\ndef f(x):\n    return x\n"  # the same work, other code (line numbers)
WORK = (
    "def f(x):\n    total = 0\n    for i in range(400):\n        total += i * x\n    return total\n"
)
WORK_NEW = "\n" + WORK


def load(directory: Path, name: str, source: str) -> types.ModuleType:
    path = directory / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def per_call(fn: Callable[[int], object], number: int, clock: Callable[[], float]) -> float:
    started = clock()
    for i in range(number):
        fn(i)
    return (clock() - started) / number


def compare(
    fn: Callable[[int], object],
    twin: Callable[[int], object],
    *,
    rounds: int,
    number: int,
    clock: Callable[[], float] = time.thread_time,
) -> tuple[float, float, float]:
    """(median ns/call of fn, of twin, median ratio), alternating rounds.

    The default clock is this thread's CPU time, which other processes of a shared machine do
    not inflate; the shadow rows also use the wall clock, which includes waiting for the GIL
    while the shadow worker runs.
    """
    a, b, ratios = [], [], []
    for _ in range(rounds):
        x = per_call(fn, number, clock)
        y = per_call(twin, number, clock)
        a.append(x)
        b.append(y)
        ratios.append(x / y)
    return statistics.median(a) * 1e9, statistics.median(b) * 1e9, statistics.median(ratios)


def drain(trial: hotpatch.Trial, deadline_s: float = 60.0) -> None:
    """Wait (bounded) until the shadow worker has taken every queued call."""
    give_up = time.monotonic() + deadline_s
    while trial._queue.qsize() and time.monotonic() < give_up:
        time.sleep(0.001)


def shadow_figures(
    fn: Callable[[int], object],
    twin: Callable[[int], object],
    trial: hotpatch.Trial,
    *,
    rounds: int,
    number: int,
) -> dict[str, tuple[float, float]]:
    """Per figure, (median over rounds for fn, for twin), in ns per call; alternating rounds.

    ``worker CPU`` is the shadow worker thread's CPU time over a round and its drain (its
    thread CPU clock where the platform has one, else the process's CPU time less the
    caller's), per call of the caller.
    """
    worker = trial._worker
    assert worker is not None and worker.ident is not None
    try:
        worker_clock = time.pthread_getcpuclockid(worker.ident)

        def worker_cpu() -> float:
            return time.clock_gettime(worker_clock)

        def others_cpu(process: float, caller: float) -> float:
            return worker_cpu()

    except (AttributeError, OSError):  # no per-thread CPU clock here: all other threads

        def others_cpu(process: float, caller: float) -> float:
            return process - caller

    out: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("caller CPU", "worker CPU", "wall", "wall p50", "wall p99")
    }
    for _ in range(rounds):
        for side, f in ((0, fn), (1, twin)):
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            other0 = others_cpu(time.process_time(), cpu0)
            for i in range(number):
                f(i)
            cpu1, wall1 = time.thread_time(), time.perf_counter()
            drain(trial)
            other1 = others_cpu(time.process_time(), time.thread_time())
            out["caller CPU"][side].append((cpu1 - cpu0) / number)
            out["worker CPU"][side].append((other1 - other0) / number)
            out["wall"][side].append((wall1 - wall0) / number)
            each = []
            clock = time.perf_counter
            for i in range(number):
                started = clock()
                f(i)
                each.append(clock() - started)
            drain(trial)
            each.sort()
            out["wall p50"][side].append(each[len(each) // 2])
            out["wall p99"][side].append(each[int(len(each) * 0.99)])
    return {
        k: (statistics.median(a) * 1e9, statistics.median(b) * 1e9) for k, (a, b) in out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--number", type=int, default=100_000)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        engine = Engine()
        mod = load(directory, "bench_trial_trivial", TRIVIAL)
        twin = load(directory, "bench_trial_trivial_twin", TRIVIAL).f
        trial = hotpatch.canary(
            {mod.__name__: TRIVIAL_NEW}, steps=(50, 100), step_s=3600, engine=engine
        )
        rounds, number = args.rounds, args.number
        rows.append(("dispatch, no key", *compare(mod.f, twin, rounds=rounds, number=number)))
        with hotpatch.routing_key("user-42"):
            rows.append(
                ("dispatch, routing key", *compare(mod.f, twin, rounds=rounds, number=number))
            )
        trial._dispatcher.cell()[0] = False  # as inside a dispatched call: the arm is set
        rows.append(("dispatch, nested call", *compare(mod.f, twin, rounds=rounds, number=number)))
        trial._dispatcher.cell()[0] = None
        result = trial.promote()
        assert result.outcome == "promoted", result
        rows.append(("after promote", *compare(mod.f, twin, rounds=rounds, number=number)))

        heavy = load(directory, "bench_trial_work", WORK)
        heavy_twin = load(directory, "bench_trial_work_twin", WORK).f
        number = max(args.number // 50, 100)  # ~50 us calls
        for sample in (0.01, 0.1):
            shadowed = hotpatch.shadow(
                {heavy.__name__: WORK_NEW},
                sample=sample,
                min_calls=10**9,
                promote=False,
                engine=engine,
            )
            figures = shadow_figures(heavy.f, heavy_twin, shadowed, rounds=rounds, number=number)
            for what, (ns, twin_ns) in figures.items():
                ratio = ns / twin_ns if twin_ns > 0 else float("nan")
                rows.append((f"shadowed caller, sample {sample:.0%}, {what}", ns, twin_ns, ratio))
            status = shadowed.status()
            shadowed.abort()
            print(f"  (sample {sample:.0%}: {status.compared} compared, {status.dropped} dropped)")
    print(f"python {sys.version.split()[0]}, {args.rounds} alternating rounds")
    print("| call | dispatched ns/call | twin ns/call | ratio | difference ns/call |")
    print("|---|---|---|---|---|")
    for label, ns, twin_ns, ratio in rows:
        print(f"| {label} | {ns:.0f} | {twin_ns:.0f} | {ratio:.3f} | {ns - twin_ns:.0f} |")


if __name__ == "__main__":
    main()
