"""Benchmark the in-process engine against ``importlib.reload``, side by side in one run.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py            # full run, 1.5 to 2 minutes
    .venv/bin/python benchmarks/bench_engine.py --quick    # smoke run, 15 to 20 seconds

Three measurements, printed as tables:

1. Patch latency. ``Engine().patch(name)`` (the engine re-reads the file) after a one-function edit
   of a generated 300-line and 3,000-line module, against ``importlib.reload`` of an identical
   module after the same edit. The edit alternates between two bodies, so every iteration changes
   code; the two peers run interleaved (ABBA order) in the same loop. Bytecode caching is off for
   the whole run (``sys.dont_write_bytecode`` and a temp directory with no ``__pycache__``), so
   ``reload`` compiles from source every time, as the engine does. A separate, instrumented run
   splits the engine's time into stages.
2. Call overhead. A function and a method patched several times against their unpatched twins from
   an identical module, called in a tight ``timeit`` loop, interleaved.
3. Memory. 1,000 patch/rollback cycles of one module, then 1,000 alternating patches, with
   ``tracemalloc`` and RSS (``VmRSS``) sampled every 100 cycles; then 12 patches of the 3,000-line
   module: what a full history holds, and what it adds to every full ``gc.collect()``.

Everything the benchmark writes lives in a temporary directory that is removed at the end. The
benchmark configures structlog as a host application would (INFO and up, JSON, to ``os.devnull``):
the engine's own log events are part of its cost, but nothing is printed.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import gc
import importlib
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

import hotpatch
import hotpatch.engine
import hotpatch.engine.pieces
import hotpatch.engine.swap

MISSING = object()
PREFIX = f"hpbench_{os.getpid()}_"

# The one function every latency edit changes: same line count in both bodies, different code.
FUNCTION_BODIES = (
    "    value = x * 2 + OFFSET\n    return value\n",
    "    value = x * 3 - OFFSET\n    return value\n",
)
METHOD_BODIES = (
    "        value = x * 2 + self.offset\n        return value\n",
    "        value = x * 3 - self.offset\n        return value\n",
)
OFFSET = 7


def expected_target(body: int, x: int) -> int:
    return x * 2 + OFFSET if body == 0 else x * 3 - OFFSET


# -- the generated module ---------------------------------------------------------------------------
_HEADER = '''\
"""Generated module for hotpatch benchmarks: {lines} lines of ordinary application code."""

import math
import re
from collections import defaultdict

OFFSET = {offset}
MAX_ITEMS = 250
TIMEOUT_S = 2.5
SERVICE_NAME = "inventory"
_WORD = re.compile(r"[a-z]+")

SETTINGS = {{
    "alpha": 1,
    "beta": 2.5,
    "gamma": "three",
    "retries": 3,
    "backoff_s": 0.25,
    "features": ["search", "export", "audit"],
    "limits": {{"read": 100, "write": 10}},
}}


def target(x):
    """The function the benchmark edits."""
{function_body}

class Hot:
    """The class whose method the call-overhead benchmark edits."""

    def __init__(self, offset=OFFSET):
        self.offset = offset

    def compute(self, x):
{method_body}
'''

_FUNCTION = '''

def {name}(items, scale=1.0, *, limit=MAX_ITEMS):
    """Summarise ``items`` ({n})."""
    total = 0.0
    seen = set()
    for i, item in enumerate(items):
        if i >= limit:
            break
        if item in seen:
            continue
        seen.add(item)
        if item % 3 == 0:
            total += item * scale
        elif item % 3 == 1:
            total -= math.sqrt(abs(item))
        else:
            total += SETTINGS.get("alpha", 0) + {n}
    return round(total, 3)
'''

_PRIVATE_FUNCTION = """

def _{name}(text):
    words = _WORD.findall(text.lower())
    counts = defaultdict(int)
    for word in words:
        counts[word] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:{n}]
"""

_CLASS = '''

class {name}:
    """A service object ({n})."""

    retries = SETTINGS["retries"]
    timeout_s = TIMEOUT_S

    def __init__(self, name, size={n}):
        self.name = name
        self.size = size
        self._cache = {{}}

    def lookup(self, key, default=None):
        if key in self._cache:
            return self._cache[key]
        value = self._load(key)
        if value is None:
            return default
        self._cache[key] = value
        return value

    def _load(self, key):
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {{type(key).__name__}}")
        return key.upper() if len(key) < self.size else None

    @property
    def label(self):
        return f"{{SERVICE_NAME}}:{{self.name}}:{n}"

    @classmethod
    def create(cls, name):
        return cls(name, size=len(name) + {n})

    @staticmethod
    def normalize(text):
        return " ".join(_WORD.findall(text.lower()))
'''


def generate_module(lines: int, *, function_body: int = 0, method_body: int = 0) -> str:
    """A module of about ``lines`` lines; ``target`` and ``Hot.compute`` take the given bodies."""
    parts = [
        _HEADER.format(
            lines=lines,
            offset=OFFSET,
            function_body=FUNCTION_BODIES[function_body],
            method_body=METHOD_BODIES[method_body],
        )
    ]
    count = parts[0].count("\n")
    n = 0
    while count < lines:
        n += 1
        if n % 12 == 0:
            chunk = _CLASS.format(name=f"Service{n:04d}", n=n)
        elif n % 4 == 0:
            chunk = _PRIVATE_FUNCTION.format(name=f"words_{n:04d}", n=n)
        else:
            chunk = _FUNCTION.format(name=f"summarize_{n:04d}", n=n)
        parts.append(chunk)
        count += chunk.count("\n")
    return "".join(parts)


def describe_module(text: str) -> str:
    functions = text.count("\ndef ")
    classes = text.count("\nclass ")
    return f"{text.count(chr(10))} lines, {functions} functions, {classes} classes"


# -- helpers -------------------------------------------------------------------------------------------
def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, so the output can go into docs/performance.md as it is."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    print()


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


@dataclass
class Workspace:
    """A temp directory on ``sys.path`` holding the generated modules."""

    root: Path

    def module(self, name: str, text: str) -> tuple[types.ModuleType, Path]:
        path = self.root / f"{PREFIX}{name}.py"
        write(path, text)
        importlib.invalidate_caches()
        return importlib.import_module(f"{PREFIX}{name}"), path


@contextmanager
def workspace() -> Iterator[Workspace]:
    saved_dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # neither peer reads or writes .pyc: both compile the source
    with tempfile.TemporaryDirectory(prefix="hpbench-") as tmp:
        root = Path(tmp)
        sys.path.insert(0, tmp)
        try:
            yield Workspace(root)
            leftovers = list(root.rglob("*.pyc"))
            assert not leftovers, f"bytecode was written: {leftovers}"
        finally:
            sys.path.remove(tmp)
            for name in [n for n in sys.modules if n.startswith(PREFIX)]:
                del sys.modules[name]
            sys.dont_write_bytecode = saved_dont_write


def revision() -> str:
    """The commit the engine under test comes from, and whether hotpatch/ had local changes."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "hotpatch"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    if not head:
        return "unknown revision"
    return f"commit {head}" + (" with uncommitted changes in hotpatch/" if dirty.strip() else "")


def configure_logging(devnull: object) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(devnull),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


# -- 1. patch latency ----------------------------------------------------------------------------------
@dataclass
class LatencyResult:
    lines: int
    shape: str
    engine_s: list[float]
    reload_s: list[float]
    # the same calls in this thread's CPU time (``time.thread_time``): less disturbed by other
    # work on a shared machine than the wall clock
    engine_cpu_s: list[float] = field(default_factory=list)
    reload_cpu_s: list[float] = field(default_factory=list)

    def cpu_ratio(self) -> float:
        return statistics.median(self.engine_cpu_s) / statistics.median(self.reload_cpu_s)


def bench_latency(ws: Workspace, lines: int, iterations: int, warmup: int = 4) -> LatencyResult:
    texts = [generate_module(lines, function_body=b) for b in (0, 1)]
    engine_mod, engine_path = ws.module(f"latency_{lines}_engine", texts[0])
    reload_mod, reload_path = ws.module(f"latency_{lines}_reload", texts[0])
    engine = hotpatch.Engine()
    engine.track(engine_mod.__name__)
    held_target = engine_mod.target  # a reference taken before any edit: must run the new code
    engine_s: list[float] = []
    reload_s: list[float] = []
    engine_cpu: list[float] = []
    reload_cpu: list[float] = []

    def run_engine() -> tuple[float, float]:
        gc.collect()
        started, cpu = time.perf_counter(), time.thread_time()
        result = engine.patch(engine_mod.__name__)
        elapsed = time.perf_counter() - started, time.thread_time() - cpu
        assert result.changed == ("target",), result
        return elapsed

    def run_reload() -> tuple[float, float]:
        gc.collect()
        started, cpu = time.perf_counter(), time.thread_time()
        importlib.reload(reload_mod)
        return time.perf_counter() - started, time.thread_time() - cpu

    for i in range(warmup + iterations):
        body = 1 - i % 2  # B, A, B, A, ...: every iteration changes code
        write(engine_path, texts[body])
        write(reload_path, texts[body])
        if i % 4 in (0, 3):  # ABBA: each peer goes first equally often, with each body
            e, r = run_engine(), run_reload()
        else:
            r, e = run_reload(), run_engine()
        assert held_target(10) == expected_target(body, 10), "engine did not apply the edit"
        assert reload_mod.target(10) == expected_target(body, 10), "reload did not apply the edit"
        if i >= warmup:
            engine_s.append(e[0])
            reload_s.append(r[0])
            engine_cpu.append(e[1])
            reload_cpu.append(r[1])
    return LatencyResult(
        lines, describe_module(texts[0]), engine_s, reload_s, engine_cpu, reload_cpu
    )


def release_edit(text: str, every: int) -> tuple[str, tuple[str, ...]]:
    """``text`` with the body of every ``every``-th public function changed, as a release does:
    edits scattered over the whole module. Returns the new text and the names changed."""
    changed = []
    for n in range(1, 10_000, every):
        old = f'    """Summarise ``items`` ({n})."""\n    total = 0.0\n'
        if old in text:
            text = text.replace(old, old.replace("total = 0.0", "total = 0.5"), 1)
            changed.append(f"summarize_{n:04d}")
    return text, tuple(sorted(changed))


def bench_release(
    ws: Workspace, lines: int, iterations: int, every: int = 10, warmup: int = 2
) -> LatencyResult:
    """Like ``bench_latency``, with a release-sized edit: every ``every``-th function changed."""
    base = generate_module(lines)
    edited, names = release_edit(base, every)
    texts = [base, edited]
    engine_mod, engine_path = ws.module(f"release_{lines}_engine", base)
    reload_mod, reload_path = ws.module(f"release_{lines}_reload", base)
    engine = hotpatch.Engine()
    engine.track(engine_mod.__name__)
    engine_s: list[float] = []
    reload_s: list[float] = []
    engine_cpu: list[float] = []
    reload_cpu: list[float] = []
    for i in range(warmup + iterations):
        version = 1 - i % 2
        write(engine_path, texts[version])
        write(reload_path, texts[version])
        timed: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for peer in ("engine", "reload") if i % 4 in (0, 3) else ("reload", "engine"):
            gc.collect()
            started, cpu_started = time.perf_counter(), time.thread_time()
            if peer == "engine":
                result = engine.patch(engine_mod.__name__)
            else:
                importlib.reload(reload_mod)
            timed[peer] = time.perf_counter() - started
            cpu[peer] = time.thread_time() - cpu_started
            if peer == "engine":
                assert tuple(sorted(result.changed)) == names, result
        if i >= warmup:
            engine_s.append(timed["engine"])
            reload_s.append(timed["reload"])
            engine_cpu.append(cpu["engine"])
            reload_cpu.append(cpu["reload"])
    shape = f"{len(names)} of its functions edited, spread over the file"
    return LatencyResult(lines, shape, engine_s, reload_s, engine_cpu, reload_cpu)


STAGES = (  # (label, module, global names tried in turn): the engine's stages, in pipeline order
    ("read file", "engine", ("read_source_file",)),
    ("compile source, statement index, sha256", "engine", ("compile_source",)),
    ("  of which compile() (the changed statements)", "pieces", ("compile",)),
    ("execute the candidate", "engine", ("build_candidate",)),
    ("plan: pair objects, check API, change set", "engine", ("plan_update",)),
    ("  of which signature checks (inspect.signature)", "swap", ("signature_incompatibility",)),
    ("commit at the safe point", "engine", ("commit_at_safe_point", "at_safe_point")),
)
_BUILTINS = frozenset({"compile", "exec"})  # shadowed in the module's globals while timed


@contextmanager
def stage_timers(totals: dict[str, float]) -> Iterator[None]:
    """Wrap the engine's stages (module globals, or builtins shadowed there) with timers.

    Stages the engine no longer has under these names are left out of ``totals``.
    """
    namespaces = {
        "engine": vars(hotpatch.engine.pipeline),
        "pieces": vars(hotpatch.engine.pieces),
        "swap": vars(hotpatch.engine.swap),
    }
    saved: list[tuple[dict[str, object], str, object]] = []

    def timed(label: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - started

        return wrapper

    for label, where, names in STAGES:
        ns = namespaces[where]
        name = next((n for n in names if n in ns or n in _BUILTINS), None)
        if name is None:
            continue
        saved.append((ns, name, ns.get(name, MISSING)))
        ns[name] = timed(label, ns[name] if name in ns else getattr(builtins, name))
        totals.setdefault(label, 0.0)
    try:
        yield
    finally:
        for ns, name, value in saved:
            if value is MISSING:
                del ns[name]
            else:
                ns[name] = value


def bench_breakdown(
    ws: Workspace, lines: int, iterations: int
) -> tuple[dict[str, float], float, float]:
    """Per-patch seconds by stage (instrumented run, not the timed one); plus reference compiles."""
    texts = [generate_module(lines, function_body=b) for b in (0, 1)]
    mod, path = ws.module(f"breakdown_{lines}", texts[0])
    engine = hotpatch.Engine()
    engine.track(mod.__name__)
    totals: dict[str, float] = {}
    total = 0.0
    with stage_timers(totals):
        for i in range(iterations):
            write(path, texts[1 - i % 2])
            gc.collect()
            started = time.perf_counter()
            engine.patch(mod.__name__)
            total += time.perf_counter() - started
    per_patch = {k: v / iterations for k, v in totals.items()}
    per_patch["total"] = total / iterations
    # What reload compiles from (source text) against what the engine compiles from (an AST).
    source_s, ast_s = [], []
    for _ in range(max(5, iterations // 2)):
        gc.collect()
        started = time.perf_counter()
        compile(texts[0], str(path), "exec", dont_inherit=True)
        source_s.append(time.perf_counter() - started)
        gc.collect()
        started = time.perf_counter()
        tree = ast.parse(texts[0], str(path))
        compile(tree, str(path), "exec", dont_inherit=True)
        ast_s.append(time.perf_counter() - started)
        del tree
    return per_patch, statistics.median(source_s), statistics.median(ast_s)


# -- 2. call overhead ----------------------------------------------------------------------------------
def bench_calls(ws: Workspace, repeats: int, number: int, patches: int = 4) -> list[list[str]]:
    texts = {
        (f, m): generate_module(300, function_body=f, method_body=m) for f in (0, 1) for m in (0, 1)
    }
    patched_mod, patched_path = ws.module("calls_patched", texts[0, 0])
    twin_mod, _ = ws.module("calls_twin", texts[0, 0])
    engine = hotpatch.Engine()
    engine.track(patched_mod.__name__)
    patched_fn, patched_obj = patched_mod.target, patched_mod.Hot()
    for i in range(patches):  # B, A, B, A: ends on the twin's code, compiled anew
        body = 1 - i % 2
        write(patched_path, texts[body, body])
        engine.patch(patched_mod.__name__)
    last = 1 - (patches - 1) % 2
    assert last == 0, "an even number of patches ends on the twin's bodies"
    assert patched_fn.__code__ is not twin_mod.target.__code__
    assert patched_fn.__code__.co_code == twin_mod.target.__code__.co_code
    assert patched_fn(10) == twin_mod.target(10) and patched_obj.compute(
        10
    ) == twin_mod.Hot().compute(10)
    cases = {
        "function `target(3)`": {
            "twin": (twin_mod.target, "f(3)"),
            "patched": (patched_fn, "f(3)"),
        },
        "method `obj.compute(3)`": {
            "twin": (twin_mod.Hot(), "f.compute(3)"),
            "patched": (patched_obj, "f.compute(3)"),
        },
    }
    empty = timeit.Timer("pass")
    rows = []
    for case, peers in cases.items():
        timers = {k: timeit.Timer(stmt, globals={"f": obj}) for k, (obj, stmt) in peers.items()}
        for t in timers.values():
            t.timeit(number)  # warm up: specialise the bytecode
        per_call: dict[str, list[float]] = {"twin": [], "patched": [], "loop": []}
        for r in range(repeats):
            order = ["twin", "patched"] if r % 2 == 0 else ["patched", "twin"]
            for key in order:
                per_call[key].append(timers[key].timeit(number) / number * 1e9)
            per_call["loop"].append(empty.timeit(number) / number * 1e9)
        twin = statistics.median(per_call["twin"])
        patched = statistics.median(per_call["patched"])
        loop = statistics.median(per_call["loop"])
        rows.append(
            [
                case,
                f"{twin:.1f}",
                f"{patched:.1f}",
                f"{patched / twin:.3f}",
                f"{(patched - loop) / (twin - loop):.3f}",
                f"{loop:.1f}",
            ]
        )
    return rows


# -- 3. memory ------------------------------------------------------------------------------------------
@dataclass
class MemoryRun:
    label: str
    cycles: list[int]
    traced: list[int]  # bytes
    rss: list[int]  # KiB
    note: str = ""

    def growth(self, series: list[float]) -> tuple[float, float]:
        """Growth per 100 cycles in the first half and in the last half of the run."""
        mid = len(series) // 2
        span_first = (self.cycles[mid] - self.cycles[0]) / 100
        span_last = (self.cycles[-1] - self.cycles[mid]) / 100
        return (series[mid] - series[0]) / span_first, (series[-1] - series[mid]) / span_last


def sample(cycles: list[int], traced: list[int], rss: list[int], done: int) -> None:
    gc.collect()
    cycles.append(done)
    traced.append(tracemalloc.get_traced_memory()[0])
    rss.append(rss_kib())


def bench_memory(ws: Workspace, cycles: int, every: int = 100) -> list[MemoryRun]:
    texts = [generate_module(300, function_body=b) for b in (0, 1)]
    runs = []

    mod, _ = ws.module("memory_rollback", texts[0])
    engine = hotpatch.Engine()
    engine.track(mod.__name__)
    held = mod.target
    done: list[int] = []
    traced: list[int] = []
    rss: list[int] = []
    tracemalloc.start()
    try:
        sample(done, traced, rss, 0)
        for i in range(1, cycles + 1):
            engine.patch(mod.__name__, source=texts[1])
            assert held(10) == expected_target(1, 10)
            engine.rollback(mod.__name__)
            assert held(10) == expected_target(0, 10)
            if i % every == 0:
                sample(done, traced, rss, i)
    finally:
        tracemalloc.stop()
    runs.append(
        MemoryRun(
            "patch + rollback",
            done,
            traced,
            rss,
            note=f"history entries at the end: {len(engine.history(mod.__name__))}",
        )
    )

    mod, _ = ws.module("memory_alternate", texts[0])
    engine = hotpatch.Engine()
    engine.track(mod.__name__)
    held = mod.target
    done, traced, rss = [], [], []
    longest = 0
    tracemalloc.start()
    try:
        sample(done, traced, rss, 0)
        for i in range(1, cycles + 1):
            body = i % 2
            engine.patch(mod.__name__, source=texts[body])
            assert held(10) == expected_target(body, 10)
            longest = max(longest, len(engine.history(mod.__name__)))
            if i % every == 0:
                sample(done, traced, rss, i)
    finally:
        tracemalloc.stop()
    rollbacks = 0
    while True:
        try:
            engine.rollback(mod.__name__)
        except hotpatch.HotpatchError:
            break
        rollbacks += 1
    runs.append(
        MemoryRun(
            "alternating patches",
            done,
            traced,
            rss,
            note=(
                f"history entries: at most {longest} (history_limit={engine.history_limit}); "
                f"rollbacks possible afterwards: {rollbacks}"
            ),
        )
    )
    return runs


@dataclass
class Footprint:
    lines: int
    traced_mib: list[float]  # after each patch
    objects_before: int
    objects_after: int
    full_gc_before_ms: float
    full_gc_after_ms: float


def full_gc_ms(repeats: int = 9) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def bench_footprint(ws: Workspace, lines: int, patches: int, gc_repeats: int) -> Footprint:
    """What the history of one module holds once full, and what it costs every full collection."""
    texts = [generate_module(lines, function_body=b) for b in (0, 1)]
    mod, _ = ws.module(f"footprint_{lines}", texts[0])
    engine = hotpatch.Engine()
    engine.track(mod.__name__)
    gc.collect()
    objects_before, gc_before = len(gc.get_objects()), full_gc_ms(gc_repeats)
    traced = []
    tracemalloc.start()
    try:
        for i in range(patches):
            engine.patch(mod.__name__, source=texts[1 - i % 2])
            gc.collect()
            traced.append(tracemalloc.get_traced_memory()[0] / 2**20)
    finally:
        tracemalloc.stop()
    gc.collect()
    gc_after = full_gc_ms(gc_repeats)
    return Footprint(lines, traced, objects_before, len(gc.get_objects()), gc_before, gc_after)


# -- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under 30 s)")
    args = parser.parse_args(argv)
    quick = args.quick
    sizes = {300: 30 if quick else 300, 3000: 16 if quick else 120}
    breakdown_n = 6 if quick else 30
    release_n = 10 if quick else 60
    call_repeats, call_number = (11, 100_000) if quick else (61, 200_000)
    memory_cycles = 200 if quick else 1000
    footprint_patches = 12  # history_limit + 2: full, then steady
    gc_repeats = 3 if quick else 9

    started = time.perf_counter()
    print("# hotpatch in-process engine benchmark" + (" (--quick)" if quick else ""))
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(f"hotpatch {hotpatch.__version__} ({revision()})")
    print()

    with open(os.devnull, "w", encoding="utf-8") as devnull, workspace() as ws:
        configure_logging(devnull)
        try:
            # 1. latency
            latency = [bench_latency(ws, lines, n) for lines, n in sizes.items()]
            print("## 1. Patch latency: one-function edit, engine.patch(name) vs importlib.reload")
            print()
            rows = []
            for res in latency:
                e_med, r_med = statistics.median(res.engine_s), statistics.median(res.reload_s)
                rows.append(
                    [
                        f"{res.lines:,}-line ({res.shape})",
                        str(len(res.engine_s)),
                        ms(e_med),
                        ms(percentile(res.engine_s, 95)),
                        ms(r_med),
                        ms(percentile(res.reload_s, 95)),
                        f"{e_med / r_med:.2f}x",
                        f"{res.cpu_ratio():.2f}x",
                    ]
                )
            print_table(
                [
                    "module",
                    "n",
                    "engine median ms",
                    "engine p95 ms",
                    "reload median ms",
                    "reload p95 ms",
                    "engine / reload (medians)",
                    "same, CPU time",
                ],
                rows,
            )
            goal = latency[-1]
            goal_ratio = statistics.median(goal.engine_s) / statistics.median(goal.reload_s)
            print(
                f"Goal: engine median <= 1.5x reload on the 3,000-line module: "
                f"{goal_ratio:.2f}x, {'met' if goal_ratio <= 1.5 else 'NOT met'}."
            )
            print()

            release = bench_release(ws, 3000, release_n)
            e_med = statistics.median(release.engine_s)
            r_med = statistics.median(release.reload_s)
            print(f"### Release-sized edit: 3,000-line module, {release.shape}")
            print()
            print_table(
                [
                    "n",
                    "engine median ms",
                    "engine p95 ms",
                    "reload median ms",
                    "reload p95 ms",
                    "engine / reload (medians)",
                    "same, CPU time",
                ],
                [
                    [
                        str(len(release.engine_s)),
                        ms(e_med),
                        ms(percentile(release.engine_s, 95)),
                        ms(r_med),
                        ms(percentile(release.reload_s, 95)),
                        f"{e_med / r_med:.2f}x",
                        f"{release.cpu_ratio():.2f}x",
                    ]
                ],
            )
            print()

            stages, source_compile, ast_compile = bench_breakdown(ws, 3000, breakdown_n)
            print(
                f"### Engine breakdown, 3,000-line module (instrumented run, {breakdown_n} patches;"
                " not the timed run)"
            )
            print()
            total = stages.pop("total")
            accounted = sum(v for k, v in stages.items() if not k.startswith("  "))
            rows = [[k, ms(v), f"{v / total:.0%}"] for k, v in stages.items()]
            rows.append(
                [
                    "rest (hashing, history, logging, lock, linecache)",
                    ms(total - accounted),
                    f"{(total - accounted) / total:.0%}",
                ]
            )
            rows.append(["total per patch", ms(total), "100%"])
            print_table(["stage", "ms per patch", "share"], rows)
            print(
                f"Reference, same 3,000-line source: compile(source text) {ms(source_compile)} ms "
                f"(what reload does); ast.parse + compile(tree) {ms(ast_compile)} ms."
            )
            print()

            # 2. call overhead
            rows = bench_calls(ws, call_repeats, call_number)
            print(
                f"## 2. Call overhead: patched 4 times vs unpatched twin "
                f"(timeit, {call_number:,} calls x {call_repeats} repeats, interleaved; medians)"
            )
            print()
            print_table(
                [
                    "call",
                    "twin ns/call",
                    "patched ns/call",
                    "ratio",
                    "ratio net of loop",
                    "empty loop ns",
                ],
                rows,
            )

            # 3. memory
            runs = bench_memory(ws, memory_cycles)
            print(
                f"## 3. Memory: {memory_cycles:,} cycles on the 300-line module, sampled every 100 "
                "(after gc.collect())"
            )
            print()
            rows = []
            for run in runs:
                t_first, t_last = run.growth(run.traced)
                r_first, r_last = run.growth(run.rss)
                bounded = abs(t_last) <= 16 * 1024
                rows.append(
                    [
                        run.label,
                        f"{run.traced[0] / 1024:,.0f} -> {run.traced[-1] / 1024:,.0f}",
                        f"{t_first / 1024:+.1f}",
                        f"{t_last / 1024:+.1f}",
                        f"{run.rss[0]:,} -> {run.rss[-1]:,}",
                        f"{r_first:+.0f}",
                        f"{r_last:+.0f}",
                        "yes" if bounded else "NO",
                    ]
                )
            print_table(
                [
                    "run",
                    "traced KiB",
                    "traced KiB/100 (1st half)",
                    "traced KiB/100 (2nd half)",
                    "RSS KiB",
                    "RSS KiB/100 (1st half)",
                    "RSS KiB/100 (2nd half)",
                    "bounded",
                ],
                rows,
            )
            for run in runs:
                print(f"- {run.label}: {run.note}")
                print(f"  traced KiB by 100s: {[round(t / 1024) for t in run.traced]}")
                print(f"  RSS KiB by 100s: {run.rss}")
            print()

            fp = bench_footprint(ws, 3000, footprint_patches, gc_repeats)
            print(
                f"### What the history holds: {footprint_patches} alternating patches of the "
                "3,000-line module"
            )
            print()
            steps = [b - a for a, b in zip(fp.traced_mib, fp.traced_mib[1:])]
            print_table(
                ["measure", "value"],
                [
                    ["traced MiB after each patch", ", ".join(f"{t:.1f}" for t in fp.traced_mib)],
                    ["MiB added per kept version (median step)", f"{statistics.median(steps):.2f}"],
                    [
                        "objects tracked by the cyclic GC, before -> after",
                        f"{fp.objects_before:,} -> {fp.objects_after:,}",
                    ],
                    [
                        f"full gc.collect() ms, before -> after (median of {gc_repeats})",
                        f"{fp.full_gc_before_ms:.1f} -> {fp.full_gc_after_ms:.1f}",
                    ],
                ],
            )
        finally:
            structlog.reset_defaults()
    print(
        f"Finished in {time.perf_counter() - started:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
