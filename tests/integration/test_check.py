"""`hotpatch check [--base REF] [PATH ...]`: real git repositories, the real command line.

Every test makes a git repository in tmp_path, commits a base version, edits the work tree, and
runs ``python -m hotpatch check`` (or ``hotpatch.check.check``) for real: the base is imported in a
real subprocess and the engine guards the new version there. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hotpatch.check import CheckReport, check
from hotpatch.cli import build_parser
from hotpatch.cli._check import render
from hotpatch.demo.harness import wait_until

pytestmark = pytest.mark.timeout(240)

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


@dataclass
class Repo:
    root: Path

    def git(self, *args: str | bytes) -> bytes:
        return subprocess.run(
            [*GIT, *args], cwd=self.root, check=True, capture_output=True, timeout=60
        ).stdout

    def write(self, path: str | bytes, text: str) -> Path:
        target = Path(os.fsdecode(self.root)) / os.fsdecode(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text), encoding="utf-8")
        return target

    def commit(self, message: str = "base") -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hotpatch", "--log-format", "json", "check", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=200,
            env=env,
            check=False,
        )

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        done = self.cli("--json", *args)
        assert done.stdout, done.stderr
        return done.returncode, json.loads(done.stdout)

    def check(self, **kwargs: Any) -> CheckReport:
        return check(cwd=str(self.root), **kwargs)


def by_path(report: CheckReport) -> dict[str, Any]:
    return {m.path: m for m in report.modules}


@pytest.fixture(name="repo")
def _repo(tmp_path: Path) -> Repo:
    root = tmp_path / "repo"
    root.mkdir()
    repo = Repo(root)
    repo.git("init", "-q")
    repo.write("app/__init__.py", "")
    repo.write(
        "app/calc.py",
        """\
        def add(a, b):
            return a + b

        def double(x):
            return 2 * x
        """,
    )
    repo.write(
        "app/shapes.py",
        """\
        import enum

        class Color(enum.Enum):
            RED = 1
            GREEN = 2

        class Point:
            __slots__ = ("x", "y")

            def __init__(self, x, y):
                self.x, self.y = x, y

        LIMIT = 10
        """,
    )
    repo.commit()
    return repo


# -- verdicts, JSON shape, exit codes ---------------------------------------------------------------
def test_a_body_change_is_hot_patchable_exit_0_and_the_json_shape(repo: Repo) -> None:
    repo.write(
        "app/calc.py", "def add(a, b):\n    return b + a\n\ndef double(x):\n    return 2 * x\n"
    )
    code, report = repo.json()
    assert code == 0
    assert report["verdict"] == "hot-patchable"
    assert report["exit_code"] == 0
    assert report["base"] == "HEAD"
    assert len(report["commit"]) == 40
    assert report["root"] == str(repo.root)
    assert report["skipped"] == []
    (module,) = report["modules"]
    assert module == {
        "path": "app/calc.py",
        "module": "app.calc",
        "change": "modified",
        "verdict": "hot-patchable",
        "stage": None,
        "reason": "changed add",
        "filename": None,
        "lineno": None,
        "changed": ["add"],
        "added": [],
        "removed": [],
        "derived": [],
        "renamed_from": None,
    }


def test_human_output_is_the_default(repo: Repo) -> None:
    repo.write(
        "app/calc.py", "def add(a, b):\n    return b + a\n\ndef double(x):\n    return 2 * x\n"
    )
    done = repo.cli()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("hotpatch check: changes since HEAD (")
    assert lines[1].split() == ["hot-patchable", "app/calc.py", "(app.calc):", "changed", "add"]
    assert lines[-1] == "verdict: hot-patchable in place (exit 0)"


def test_nothing_changed_exit_0(repo: Repo) -> None:
    code, report = repo.json()
    assert (code, report["verdict"], report["modules"]) == (0, "unchanged", [])


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("LIMIT = 10\n", "", "public name 'LIMIT' was removed"),
        ('__slots__ = ("x", "y")', '__slots__ = ("x", "y", "z")', "class Point: its __slots__"),
        ("GREEN = 2\n", "GREEN = 2\n    BLUE = 3\n", "class Color: its enum members changed"),
    ],
    ids=["removed-public-name", "class-layout", "enum"],
)
def test_needs_a_rolling_reload_with_the_reason(
    repo: Repo, old: str, new: str, expected: str
) -> None:
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace(old, new))
    code, report = repo.json()
    assert code == 1
    assert report["verdict"] == "needs-reload"
    (module,) = report["modules"]
    assert (module["verdict"], module["stage"]) == ("needs-reload", "compatibility")
    assert expected in module["reason"]
    assert module["filename"] == "app/shapes.py"  # the work tree's path, not the temporary tree's


def test_a_syntax_error_is_refused_at_compile_with_file_and_line(repo: Repo) -> None:
    repo.write("app/calc.py", "def add(a, b):\n    return a +\n")
    code, report = repo.json()
    assert code == 1
    assert report["verdict"] == "refused"
    (module,) = report["modules"]
    assert (module["verdict"], module["stage"]) == ("refused", "compile")
    assert (module["filename"], module["lineno"]) == ("app/calc.py", 2)
    assert "hotpatch-check-" not in json.dumps(report)  # no temporary path leaks into the report


def test_an_exception_at_import_is_refused_at_execute(repo: Repo) -> None:
    repo.write(
        "app/calc.py",
        "import no_such_module_anywhere\n\ndef add(a, b):\n    return a + b\n\n"
        "def double(x):\n    return 2 * x\n",
    )
    code, report = repo.json()
    (module,) = report["modules"]
    assert code == 1
    assert (module["verdict"], module["stage"]) == ("refused", "execute")
    assert "no_such_module_anywhere" in module["reason"]


def test_staged_and_unstaged_changes_both_count(repo: Repo) -> None:
    repo.write(
        "app/calc.py", "def add(a, b):\n    return b + a\n\ndef double(x):\n    return 2 * x\n"
    )
    repo.git("add", "app/calc.py")
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    report = repo.check()
    assert {m.path: m.verdict for m in report.modules} == {
        "app/calc.py": "hot-patchable",
        "app/shapes.py": "needs-reload",
    }
    assert report.exit_code == 1


def test_the_projects_own_verifiers_run(repo: Repo) -> None:
    """A verifier the app registers at import (``hotpatch.verifier``) guards the candidate here
    as it does in the app's process: the check uses the same default engine."""
    repo.write(
        "app/guards.py",
        """\
        import hotpatch

        import app.calc

        @hotpatch.verifier("app.calc")
        def adds_up(candidate):
            assert candidate.add(2, 2) == 4, "add(2, 2) must be 4"
        """,
    )
    repo.write("app/calc.py", "import app.guards\n\ndef add(a, b):\n    return a + b\n")
    repo.write("app/__init__.py", "")
    repo.commit("guards")
    repo.write("app/calc.py", "import app.guards\n\ndef add(a, b):\n    return a * b + 1\n")
    code, report = repo.json()
    (module,) = report["modules"]
    assert code == 1
    assert (module["verdict"], module["stage"]) == ("refused", "verify")
    assert "add(2, 2) must be 4" in module["reason"]


def test_the_modules_own_health_check_runs_after_the_commit_in_the_check_process(
    repo: Repo,
) -> None:
    """Documented in docs/ci.md: the check commits in its throwaway process, so a module's
    ``__hotpatch_health__`` runs there, and a failure refuses the change at ``health``."""
    repo.write(
        "app/calc.py",
        "def add(a, b):\n    return a - b\n\ndef double(x):\n    return 2 * x\n\n"
        "def __hotpatch_health__():\n    assert add(2, 2) == 4, 'add is broken'\n",
    )
    code, report = repo.json()
    (module,) = report["modules"]
    assert code == 1
    assert (module["verdict"], module["stage"]) == ("refused", "health")
    assert "add is broken" in module["reason"]


# -- several modules: one change set -------------------------------------------------------------
def test_modules_are_guarded_together_in_dependency_order(repo: Repo) -> None:
    """calc's new version imports a name that exists only in shapes' new version (and in a new
    module): guarded one at a time against the live base, calc would fail at execute."""
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text() + "\ndef area(w, h):\n    return w * h\n")
    repo.write("app/helpers.py", "def twice(x):\n    return x + x\n")
    repo.write(
        "app/calc.py",
        """\
        from app.helpers import twice
        from app.shapes import area

        def add(a, b):
            return area(a, 1) + b

        def double(x):
            return twice(x)
        """,
    )
    code, report = repo.json()
    verdicts = {m["path"]: (m["verdict"], m["change"]) for m in report["modules"]}
    assert verdicts == {
        "app/calc.py": ("hot-patchable", "modified"),
        "app/helpers.py": ("new", "new"),
        "app/shapes.py": ("hot-patchable", "modified"),
    }, report
    assert code == 0
    shapes = next(m for m in report["modules"] if m["path"] == "app/shapes.py")
    assert shapes["added"] == ["area"]


def test_each_module_gets_its_own_verdict_when_the_set_is_refused(repo: Repo) -> None:
    """shapes needs a reload; calc imports it (cannot be decided without it); other is broken."""
    repo.write("app/calc.py", "from app import shapes\n\ndef add(a, b):\n    return a - b\n")
    repo.write("app/other.py", "def f():\n    return 1\n")
    repo.commit("calc imports shapes")
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    repo.write("app/calc.py", "from app import shapes\n\ndef add(a, b):\n    return b - a\n")
    repo.write("app/other.py", "def f(:\n")
    report = repo.check()
    found = {m.path: m for m in report.modules}
    assert found["app/shapes.py"].verdict == "needs-reload"
    assert found["app/calc.py"].verdict == "unknown"
    assert "imports app.shapes" in found["app/calc.py"].reason
    assert (found["app/other.py"].verdict, found["app/other.py"].stage) == ("refused", "compile")
    # Dependency order, ties by name: other was guarded first, in the whole set, and refused;
    # shapes was then guarded without it, and the note says so.
    assert "guarded without" not in found["app/other.py"].reason
    assert "(guarded without app.other (was refused))" in found["app/shapes.py"].reason
    assert report.verdict == "refused"
    assert report.exit_code == 1


# -- files: new, deleted, renamed, not Python, not modules -----------------------------------------
def test_new_deleted_and_renamed_files(repo: Repo) -> None:
    repo.write("app/fresh.py", "VALUE = 1\n")  # untracked
    repo.write("app/staged.py", "VALUE = 2\n")
    repo.git("add", "app/staged.py")
    repo.write("app/broken_new.py", "def f(:\n")
    repo.git("mv", "app/calc.py", "app/arith.py")
    (repo.root / "app/shapes.py").unlink()
    report = repo.check()
    found = by_path(report)
    assert (found["app/fresh.py"].verdict, found["app/fresh.py"].change) == ("new", "new")
    assert found["app/staged.py"].verdict == "new"
    assert (found["app/broken_new.py"].verdict, found["app/broken_new.py"].stage) == (
        "refused",
        "compile",
    )
    assert found["app/arith.py"].renamed_from == "app/calc.py"
    assert found["app/arith.py"].verdict == "new"
    for deleted in ("app/calc.py", "app/shapes.py"):
        assert (found[deleted].change, found[deleted].verdict) == ("deleted", "needs-reload")
        assert "only a restart drops it" in found[deleted].reason
    assert report.exit_code == 1


def test_files_that_are_not_python_modules_are_listed_not_checked(repo: Repo) -> None:
    repo.write("README.md", "hello\n")
    repo.write("scripts/run-me.py", "print('hi')\n")
    repo.write("app/__main__.py", "print('main')\n")
    report = repo.check()
    assert report.modules == ()
    assert report.exit_code == 0
    assert {s.path: s.reason for s in report.skipped} == {
        "README.md": "not a Python file",
        "app/__main__.py": "a program's entry point (__main__), not an imported module",
        "scripts/run-me.py": "not importable as a module (a part of its path is not an identifier)",
    }
    assert "not checked    README.md: not a Python file" in render(report)


def test_src_layout_maps_files_to_module_names(tmp_path: Path) -> None:
    root = tmp_path / "srcrepo"
    root.mkdir()
    repo = Repo(root)
    repo.git("init", "-q")
    repo.write("src/lib/__init__.py", "")
    repo.write("src/lib/core.py", "def run():\n    return 1\n")
    repo.commit()
    repo.write("src/lib/core.py", "def run():\n    return 2\n")
    repo.write("src/lib/__init__.py", "def version():\n    return '2'\n")
    found = by_path(repo.check())
    assert (found["src/lib/core.py"].module, found["src/lib/core.py"].verdict) == (
        "lib.core",
        "hot-patchable",
    )
    assert (found["src/lib/__init__.py"].module, found["src/lib/__init__.py"].verdict) == (
        "lib",
        "hot-patchable",
    )


def test_path_arguments_limit_the_check_and_are_literal(repo: Repo) -> None:
    repo.write(
        "app/calc.py", "def add(a, b):\n    return b + a\n\ndef double(x):\n    return 2 * x\n"
    )
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    code, report = repo.json("app/calc.py")
    assert code == 0
    assert [m["path"] for m in report["modules"]] == ["app/calc.py"]
    # A pathspec with git's magic syntax is a file name here, not "everything but x.py".
    repo.write(":(exclude)x.py", "X = 1\n")
    code, report = repo.json(":(exclude)x.py")
    assert (code, report["modules"]) == (0, [])
    assert [s["path"] for s in report["skipped"]] == [":(exclude)x.py"]
    # From a subdirectory, paths are relative to it; the report's paths to the root.
    done = subprocess.run(
        [sys.executable, "-m", "hotpatch", "check", "--json", "calc.py"],
        cwd=repo.root / "app",
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert [m["path"] for m in json.loads(done.stdout)["modules"]] == ["app/calc.py"]


def test_files_outside_the_path_arguments_still_reach_the_candidate(repo: Repo) -> None:
    """PATH limits the verdicts, not the files: a new module the checked one imports is there,
    as it is on a server after a deploy."""
    repo.write("app/helpers.py", "def twice(x):\n    return x + x\n")
    repo.write(
        "app/calc.py",
        "from app.helpers import twice\n\ndef add(a, b):\n    return a + b\n\n"
        "def double(x):\n    return twice(x)\n",
    )
    code, report = repo.json("app/calc.py")
    assert [(m["path"], m["verdict"]) for m in report["modules"]] == [
        ("app/calc.py", "hot-patchable")
    ], report
    assert code == 0


def test_a_path_argument_that_names_nothing_is_an_error_not_a_pass(repo: Repo) -> None:
    repo.write("app/calc.py", "def add(a, b):\n    return b - a\n")
    done = repo.cli("ap/calc.py")  # a typo: "nothing changed, exit 0" would be a false pass
    assert done.returncode == 2
    assert "ap/calc.py: no such file or directory in the work tree or in the base" in done.stderr
    # A path that exists only in the base (deleted in the work tree) is a real selection.
    (repo.root / "app/shapes.py").unlink()
    code, report = repo.json("app/shapes.py")
    assert (code, [m["change"] for m in report["modules"]]) == (1, ["deleted"])


# -- the base ------------------------------------------------------------------------------------
def test_base_ref_selects_the_version_servers_run(repo: Repo) -> None:
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    repo.commit("drop LIMIT")  # committed: HEAD has no LIMIT, HEAD~1 had it
    assert repo.json()[1]["verdict"] == "unchanged"
    code, report = repo.json("--base", "HEAD~1")
    assert (code, report["verdict"], report["base"]) == (1, "needs-reload", "HEAD~1")


def test_a_base_that_does_not_import_is_unknown_with_the_stage(repo: Repo) -> None:
    repo.write("app/calc.py", "raise RuntimeError('needs a database')\n")
    repo.commit("broken base")
    repo.write("app/calc.py", "def add(a, b):\n    return a + b\n")
    code, report = repo.json()
    (module,) = report["modules"]
    assert code == 1
    assert (module["verdict"], module["stage"]) == ("unknown", "base")
    assert "the base version does not import: RuntimeError: needs a database" in module["reason"]
    assert (module["filename"], module["lineno"]) == ("app/calc.py", 1)


def test_project_output_and_exit_at_import_cannot_fake_a_verdict(repo: Repo) -> None:
    """The subprocess reports on a pipe of its own: what project code prints is not a report,
    and a base that ends the process says so."""
    fake = json.dumps({"event": "guarded", "results": [{"module": "app.shapes", "changed": []}]})
    repo.write("app/calc.py", f"print({fake!r})\nimport os\nos._exit(7)\n")
    repo.commit("exits at import")
    repo.write("app/calc.py", "def add(a, b):\n    return a + b\n")
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    found = by_path(repo.check(timeout_s=120))
    assert found["app/calc.py"].verdict == "unknown"
    assert "exited with code 7" in found["app/calc.py"].reason
    assert found["app/shapes.py"].verdict == "unknown"


@pytest.mark.parametrize("where", ["base", "new"])
def test_a_module_that_hangs_is_unknown_at_the_deadline_and_its_process_is_gone(
    repo: Repo, tmp_path: Path, where: str
) -> None:
    pidfile = tmp_path / "pid"
    hang = (
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "while True:\n    time.sleep(0.1)\n"
    )
    if where == "base":
        repo.write("app/calc.py", hang)
        repo.commit("hangs")
        repo.write("app/calc.py", "def add(a, b):\n    return a + b\n")
    else:
        repo.write("app/calc.py", hang)
    report = repo.check(timeout_s=8)
    (module,) = report.modules
    assert (module.verdict, module.stage) == ("unknown", "deadline")
    doing = "importing the base version of app.calc" if where == "base" else "guarding app.calc"
    assert f"still running after 8 s while {doing}" in module.reason
    assert report.exit_code == 1
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_the_check_process_ends_itself_when_its_parent_is_killed(
    repo: Repo, tmp_path: Path
) -> None:
    """hotpatch check killed (SIGKILL, no cleanup) while the base hangs at import: the check
    process does not hang on as an orphan; it sees its parent gone and ends, long before the
    check's own deadline (60 s here, so that no deadline races the start on a loaded machine)."""
    pidfile = tmp_path / "pid"
    repo.write(
        "app/calc.py",
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "while True:\n    time.sleep(0.1)\n",
    )
    repo.commit("hangs")
    repo.write("app/calc.py", "def add(a, b):\n    return a + b\n")
    cli = subprocess.Popen(
        [sys.executable, "-m", "hotpatch", "check", "--timeout", "60"],
        cwd=repo.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: pidfile.exists() and pidfile.read_text(), timeout_s=60, what="the base hangs"
        )
        cli.kill()
        cli.wait(timeout=30)
        pid = int(pidfile.read_text())
        assert is_running(pid)  # the parent is gone, the check process is not (yet)
        # within 50 s: before the last resort (the deadline, 60 s, and its margin) could end it
        wait_until(lambda: not is_running(pid), timeout_s=50, what="the orphan ends itself")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=30)
        if pidfile.exists() and pidfile.read_text() and is_running(int(pidfile.read_text())):
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # the session this test started


def test_the_temporary_tree_is_private_and_removed(repo: Repo, tmp_path: Path) -> None:
    """The base tree lives in a 0700 directory of its own, gone after the check, hang or not."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    modes = tmp_path / "modes"
    repo.write(
        "app/calc.py",
        f"import os, stat, sys\nhere = os.path.dirname(os.path.dirname(__file__))\n"
        f"open({str(modes)!r}, 'w').write(oct(stat.S_IMODE(os.stat(os.path.dirname(here))"
        ".st_mode)))\ndef add(a, b):\n    return a + b\n",
    )
    repo.commit("records the mode of its tree")
    repo.write("app/calc.py", (repo.root / "app/calc.py").read_text().replace("a + b", "b + a"))
    done = repo.cli(env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert modes.read_text() == "0o700"
    assert list(tmp.iterdir()) == []


# -- the documentation's session is true -------------------------------------------------------
def test_the_session_in_docs_ci_md_prints_what_it_shows(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs/ci.md").read_text(encoding="utf-8")
    block = text.split("```console\n", 1)[1].split("```", 1)[0]
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    script, expected = [], []
    for line in block.splitlines():
        if line.startswith("$ "):
            script.append(line[2:])
        else:
            expected.append(line)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],  # one shell: the session's cd holds
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the JSON log events (not a terminal)
        text=True,
        timeout=200,
        env=env,
        check=False,
    )

    def masked(lines: list[str]) -> list[str]:
        return [re.sub(r"\(([0-9a-f]{12})\)", "(<commit>)", line) for line in lines]

    assert masked(done.stdout.splitlines()) == masked(expected)


def test_the_ci_job_in_docs_ci_md_runs_options_that_exist() -> None:
    text = (Path(__file__).parents[2] / "docs/ci.md").read_text(encoding="utf-8")
    job = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in job.splitlines() if "hotpatch check --" in ln]
    words = shlex.split(line.split(">", 1)[0].replace('"$BASE"', "origin/main"))
    assert words[:2] == ["hotpatch", "check"]
    args = build_parser().parse_args(words[1:])
    assert (args.command, args.base, args.paths) == ("check", "origin/main", ["src/"])
    assert "pull_request_target" not in job.replace("never pull_request_target", "")


# -- usage and environment errors: exit 2 -----------------------------------------------------------
def test_not_a_git_work_tree_exit_2(tmp_path: Path) -> None:
    done = Repo(tmp_path).cli()
    assert done.returncode == 2
    assert "not a git repository" in done.stderr


def test_unknown_ref_exit_2(repo: Repo) -> None:
    done = repo.cli("--base", "no-such-branch")
    assert done.returncode == 2
    assert "--base 'no-such-branch' names no commit" in done.stderr


def test_a_base_that_looks_like_an_option_never_becomes_one(repo: Repo, tmp_path: Path) -> None:
    target = tmp_path / "written-by-git"
    for ref in (f"--output={target}", "--help", "-h", "--all"):
        done = repo.cli(f"--base={ref}")
        assert done.returncode == 2, (ref, done.stdout, done.stderr)
        assert "names no commit" in done.stderr
    assert not target.exists()


def test_a_ref_whose_name_starts_with_a_dash_is_a_ref(repo: Repo) -> None:
    """git lets a ref be named ``-x`` (update-ref); it must resolve as that ref, not an option."""
    path = repo.root / "app/shapes.py"
    path.write_text(path.read_text().replace("LIMIT = 10\n", ""))
    repo.commit("drop LIMIT")
    repo.git("update-ref", "refs/heads/-x", "HEAD~1")
    code, report = repo.json("--base=-x")
    assert (code, report["verdict"], report["base"]) == (1, "needs-reload", "-x")


def test_git_missing_exit_2(repo: Repo, tmp_path: Path) -> None:
    empty = tmp_path / "nobin"
    empty.mkdir()
    done = repo.cli(env={**os.environ, "PATH": str(empty)})
    assert done.returncode == 2
    assert "git is not installed" in done.stderr


def test_json_error_on_stdout_too(repo: Repo) -> None:
    done = repo.cli("--json", "--base", "nope")
    assert done.returncode == 2
    assert json.loads(done.stdout) == {
        "error": done.stderr.split(": ", 1)[1].strip(),
        "exit_code": 2,
    }


# -- hostile and odd names ------------------------------------------------------------------------
def test_odd_file_names_never_break_the_report(repo: Repo) -> None:
    odd = b"app/caf\xe9.py"  # not UTF-8
    (repo.root / os.fsdecode(odd)).write_bytes(b"X = 1\n")
    repo.write("app/new\nline.py", "X = 1\n")
    repo.write("my app/mod.py", "X = 1\n")
    repo.write("app/with space.py", "X = 1\n")
    repo.write(
        "app/calc.py", "def add(a, b):\n    return b + a\n\ndef double(x):\n    return 2 * x\n"
    )
    done = repo.cli()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 7  # header, calc, four names not checked, verdict: one line each
    assert "app/caf\\xe9.py" in done.stdout
    assert "app/new\\nline.py" in done.stdout
    code, report = repo.json()
    assert code == 0
    skipped = {s["path"] for s in report["skipped"]}
    assert {os.fsdecode(odd), "app/new\nline.py", "my app/mod.py", "app/with space.py"} <= skipped


def test_a_changed_module_that_is_now_a_link_is_not_followed(repo: Repo, tmp_path: Path) -> None:
    secret = tmp_path / "secret.py"
    secret.write_text("def add(a, b):\n    return 42\n")
    calc = repo.root / "app/calc.py"
    calc.unlink()
    calc.symlink_to(secret)
    report = repo.check()
    assert report.modules == ()
    (skipped,) = report.skipped
    assert skipped.path == "app/calc.py"
    assert "symbolic link" in skipped.reason


def test_a_module_reading_a_changed_data_file_sees_the_work_tree(repo: Repo) -> None:
    """The candidate runs where the work tree's files are (as under a server after a deploy)."""
    repo.write("app/limits.txt", "10\n")
    repo.write(
        "app/calc.py",
        "import pathlib\nLIMIT = int((pathlib.Path(__file__).parent / 'limits.txt').read_text())\n"
        "def add(a, b):\n    return min(a + b, LIMIT)\n",
    )
    repo.commit("limits")
    repo.write("app/limits.txt", "oops\n")
    repo.write(
        "app/calc.py",
        "import pathlib\nLIMIT = int((pathlib.Path(__file__).parent / 'limits.txt').read_text())\n"
        "def add(a, b):\n    return min(b + a, LIMIT)\n",
    )
    found = by_path(repo.check())
    assert (found["app/calc.py"].verdict, found["app/calc.py"].stage) == ("refused", "execute")
    assert "invalid literal for int()" in found["app/calc.py"].reason
