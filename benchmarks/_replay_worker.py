"""One process of the replay benchmark: a fresh run of one release, or a long-running replay.

The idea: the promise of in-process patching is that a patched process behaves like one restarted
on the new code. The only honest way to check it on real code is to run the same real test suite
in both and compare the outcome of every test. ``bench_replay.py`` drives this worker in three
ways, each in its own process with a deadline:

- ``fresh``: import one release of a package in a new interpreter and run its own tests twice:
  what a restart on that release does. The second run is what a replay step is compared with, as
  a replayed process has run the suite before (some suites are not repeatable in one process:
  six's ``test_lazy`` asserts that ``html.parser`` was never imported).
- ``hotpatch``: import the first release, run its tests, then for each next release write its files
  over the live ones (in place, as a deployment would), call ``hotpatch.patch_many`` on every module
  of the package that is imported (unchanged ones are no-ops), and run the tests again in the same
  process.
- ``reload``: the same, with ``importlib.reload`` of every module of the package in dependency order.

The problem: running a test suite many times in one process must not itself make the runs differ.
The mechanism: tests run through ``pytest.main`` with a plugin that records the outcome of each
test id (and of every subtest that did not pass), and every test module (and ``conftest``) is
removed from ``sys.modules`` before each run, so the tests are imported afresh against the live
package while the package itself stays as patched. Step 0 of a replay runs before any patch, so a
difference there would be the harness's, not the patch's (``bench_replay.py`` reports it).

Results go to a file, one JSON object per line, written as each step ends, so that a replay killed
at its deadline still reports what it finished. Usage (by ``bench_replay.py`` only)::

    python _replay_worker.py PLAN.json RESULTS.jsonl
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import shutil
import sys
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_SKIP_DIRS = {"__pycache__", ".git", ".tox", ".eggs"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# -- which files are tests, which are the package --------------------------------------------------
def is_test_path(rel: Path) -> bool:
    """Whether a file (relative to the release's root) belongs to the test suite, not the package."""
    parts = rel.parts
    name = parts[-1] if parts else ""
    return (
        any(p in {"tests", "test", "testing"} for p in parts[:-1])
        or name.startswith("test_")
        or name.endswith("_test.py")
        or name == "conftest.py"
    )


def module_file(module: object) -> Path | None:
    filename = getattr(module, "__file__", None)
    if not isinstance(filename, str) or not filename.endswith(".py"):
        return None
    return Path(filename)


def package_modules(root: Path, import_names: list[str]) -> dict[str, types.ModuleType]:
    """The package's live modules: named under ``import_names``, loaded from a file under ``root``."""
    found: dict[str, types.ModuleType] = {}
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType):
            continue
        if not any(name == top or name.startswith(top + ".") for top in import_names):
            continue
        path = module_file(module)
        if path is None:
            continue
        try:
            rel = path.resolve().relative_to(root)
        except ValueError:
            continue
        if is_test_path(rel) or not path.exists():
            continue
        found[name] = module
    return found


def purge_test_modules(root: Path) -> None:
    """Forget every imported test module and conftest under ``root``, so the next run imports them."""
    for name, module in list(sys.modules.items()):
        path = module_file(module)
        if path is None:
            continue
        try:
            rel = path.resolve().relative_to(root)
        except ValueError:
            continue
        if is_test_path(rel):
            del sys.modules[name]


# -- running the package's own tests ---------------------------------------------------------------
class OutcomeCollector:
    """pytest plugin: the outcome of every test id, and of every subtest that did not pass."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.exit_code: int | None = None

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.outcomes[report.nodeid or "<collection>"] = "error"

    def pytest_runtest_logreport(self, report: Any) -> None:
        nodeid = report.nodeid
        context = getattr(report, "context", None)
        if context is not None:  # a subtest: keep only the ones that did not pass
            if report.passed:
                return
            kwargs = sorted((str(k), str(v)) for k, v in dict(context.kwargs).items())
            nodeid = _ADDRESS.sub("", f"{nodeid} [subtest {context.msg!r} {kwargs}]")
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            else:
                outcome = str(report.outcome)
            if self.outcomes.get(nodeid) != "error":
                self.outcomes[nodeid] = outcome
        elif report.failed:
            self.outcomes[nodeid] = "error"
        elif report.skipped and report.when == "setup":
            self.outcomes[nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"


def run_tests(root: Path, plan: dict[str, Any]) -> dict[str, Any]:
    import pytest

    purge_test_modules(root)
    importlib.invalidate_caches()
    collector = OutcomeCollector()
    args = [
        *plan["tests"],
        "-q",
        "--no-header",
        "--tb=no",  # outcomes only: formatting thousands of failures can take longer than the run
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hotpatch",
        "--rootdir",
        str(root),
        "--continue-on-collection-errors",
        "--timeout",
        str(plan["test_timeout_s"]),
        "--timeout-method",
        "signal",
        # The worker imported hotpatch before pytest starts: pytest warns that it cannot rewrite
        # it, and a package whose config sets filterwarnings=error (toolz 1.1.0) would end the
        # run on that warning alone (its steps then read "unknown").
        "-W",
        "ignore::pytest.PytestAssertRewriteWarning",
    ]
    for nodeid in plan.get("deselect", []):
        args += ["--deselect", nodeid]
    started = time.perf_counter()
    try:
        code = pytest.main(args, plugins=[collector])
    finally:
        # The suite is a client of the package, imported afresh by the next run: left in
        # sys.modules, the previous release's test modules would count as live dependents of the
        # next patch (whose files the next release replaced), which no restarted process has.
        purge_test_modules(root)
    return {
        "outcomes": collector.outcomes,
        "pytest_exit": int(code),
        "tests_s": time.perf_counter() - started,
    }


# -- writing a release over the live files ---------------------------------------------------------
def tree_files(root: Path) -> dict[Path, Path]:
    """Relative path -> absolute path of every regular file under ``root`` (links are refused)."""
    files: dict[Path, Path] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if entry.is_symlink():
                raise RuntimeError(f"{path}: symbolic link in an extracted release")
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in _SKIP_DIRS:
                    pending.append(path)
            elif entry.is_file(follow_symlinks=False):
                files[path.relative_to(root)] = path
    return files


def write_release(new_tree: Path, live: Path) -> dict[str, list[str]]:
    """Make ``live`` hold exactly ``new_tree``'s files: changed ones rewritten in place, gone ones removed."""
    new = tree_files(new_tree)
    old = tree_files(live)
    changed, added, removed = [], [], []
    for rel, src in sorted(new.items()):
        data = src.read_bytes()
        dest = live / rel
        if rel in old:
            if old[rel].read_bytes() == data:
                continue
            changed.append(str(rel))
        else:
            added.append(str(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:  # an in-place save: same inode, new content
            f.write(data)
    for rel in sorted(set(old) - set(new)):
        (live / rel).unlink()
        removed.append(str(rel))
    importlib.invalidate_caches()
    return {"changed": changed, "added": added, "removed": removed}


# -- the three modes -------------------------------------------------------------------------------
def emit(out: Any, record: dict[str, Any]) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def start(root: Path, plan: dict[str, Any]) -> None:
    os.chdir(root)
    sys.path.insert(0, str(root / plan["src"]) if plan["src"] else str(root))
    for name in plan["import_names"]:
        importlib.import_module(name)


def run_fresh(plan: dict[str, Any], out: Any) -> None:
    root = Path(plan["versions"][0]["tree"]).resolve()
    start(root, plan)
    first = run_tests(root, plan)
    again = run_tests(root, plan)  # what a process that already ran the suite once sees
    emit(
        out,
        {
            "step": 0,
            "version": plan["versions"][0]["version"],
            **first,
            "outcomes_again": again["outcomes"],
        },
    )


@contextmanager
def syntax_tree_reads() -> Iterator[list[float]]:
    """The CPU time the engine spends in ``ast.parse`` while the block runs (``[seconds]``).

    What the engine parses is the new version's changed statements (its statement index: which
    names each binds and reads, so that unchanged state is kept and derived state follows) and,
    on first contact, whole modules: work ``importlib.reload`` does not do. ``bench_step.py``
    prints a step's ``reload + parse`` beside its ratio: what the patch would cost if the
    engine did nothing else.
    """
    from hotpatch.engine import candidate, statements

    original = statements.parse
    spent = [0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - started

    statements.parse = candidate.parse = timed  # type: ignore[assignment]
    try:
        yield spent
    finally:
        statements.parse = candidate.parse = original  # type: ignore[assignment]


def apply_hotpatch(order: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    import hotpatch

    gc.collect()  # the test run's garbage is not the step's cost (nor reload's: same there)
    started, cpu = time.perf_counter(), time.process_time()
    try:
        with syntax_tree_reads() as parse_cpu:
            results = hotpatch.patch_many(order, allow_removals=plan["allow_removals"])
    except hotpatch.PatchRejected as exc:
        return {
            "applied": False,
            "duration_s": time.perf_counter() - started,
            "refusal": {
                "module": exc.module,
                "stage": exc.stage,
                "reason": exc.reason,
                "filename": exc.filename,
                "lineno": exc.lineno,
            },
        }
    except Exception as exc:  # an engine defect: report it, never hide it
        return {
            "applied": False,
            "duration_s": time.perf_counter() - started,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
        }
    return {
        "applied": True,
        "duration_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "parse_cpu_s": parse_cpu[0],
        "patched": [r.module for r in results if not r.is_noop],
        "changed_names": sum(len(r.changed) + len(r.added) + len(r.removed) for r in results),
    }


def apply_reload(order: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    gc.collect()
    started, cpu = time.perf_counter(), time.process_time()
    for name in order:
        try:
            importlib.reload(sys.modules[name])
        except Exception as exc:
            return {
                "applied": False,
                "duration_s": time.perf_counter() - started,
                "failure": {"module": name, "error": f"{type(exc).__name__}: {exc}"},
            }
    return {
        "applied": True,
        "duration_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "patched": order,
    }


def modules_in_order(src: Path, import_names: list[str]) -> list[str]:
    """The package's imported modules, in the order their files (as written now) import them."""
    from hotpatch.engine.modulemap import in_dependency_order

    modules = package_modules(src, import_names)
    texts = {n: Path(str(m.__file__)).read_text("utf-8", "replace") for n, m in modules.items()}
    return in_dependency_order(texts)


def run_replay(plan: dict[str, Any], out: Any) -> None:
    import structlog

    mode = plan["mode"]
    devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole process
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(devnull))
    live = Path(plan["live"]).resolve()
    versions = plan["versions"]
    shutil.copytree(versions[0]["tree"], live, dirs_exist_ok=True)
    start(live, plan)
    emit(out, {"step": 0, "version": versions[0]["version"], **run_tests(live, plan)})
    src = (live / plan["src"]).resolve() if plan["src"] else live
    for step, version in enumerate(versions[1:], start=1):
        if plan.get("lockstep") and sys.stdin.readline().strip() != "go":
            return  # the replay ended (its other mode's worker died, or a deadline passed)
        track_cpu_s = None
        if mode == "hotpatch":
            import hotpatch

            # the baseline each module's statements are compared with: the file before the write;
            # track() also builds the index of every loaded module's namespace (timed: it is
            # one-time work a user pays at start-up instead of at the first patch)
            cpu = time.process_time()
            hotpatch.track(*package_modules(src, plan["import_names"]))
            track_cpu_s = time.process_time() - cpu
        files = write_release(Path(version["tree"]), live)
        order = modules_in_order(src, plan["import_names"])
        apply = apply_hotpatch if mode == "hotpatch" else apply_reload
        record: dict[str, Any] = {"step": step, "version": version["version"], "files": files}
        record["at"] = time.time()  # when the step was applied: the modes are run in turns
        if track_cpu_s is not None:
            record["track_cpu_s"] = track_cpu_s
        record.update(apply(order, plan))
        record["modules"] = order
        if record["applied"]:
            record.update(run_tests(live, plan))
        emit(out, record)


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text("utf-8"))
    sys.dont_write_bytecode = True
    with open(sys.argv[2], "a", encoding="utf-8") as out:
        if plan["mode"] == "fresh":
            run_fresh(plan, out)
        else:
            run_replay(plan, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
