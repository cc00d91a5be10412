"""The pure parts of the blue-green strategy: the re-exec argv, the new set's health, the output."""

from __future__ import annotations

import os
from typing import Any

import gunicorn  # type: ignore[import-untyped]

from hotpatch.cli._deploy import describe, verdict
from hotpatch.cli._status import describe_state
from hotpatch.gunicorn._bluegreen import new_set_problem, ready_workers, reexec_argv
from hotpatch.gunicorn._coordinator import DeployResult

PACKAGE = os.path.dirname(os.path.abspath(gunicorn.__file__))


def test_a_python_dash_m_gunicorn_master_is_re_executed_as_dash_m_gunicorn() -> None:
    main = os.path.join(PACKAGE, "__main__.py")
    argv = ["/usr/bin/python3", main, "-w", "4", "app:app"]
    assert reexec_argv(argv, PACKAGE) == [
        "/usr/bin/python3",
        "-m",
        "gunicorn",
        "-w",
        "4",
        "app:app",
    ]


def test_other_re_exec_argvs_are_kept_as_they_are() -> None:
    script = ["/usr/bin/python3", "/srv/venv/bin/gunicorn", "-w", "4", "app:app"]
    assert reexec_argv(script, PACKAGE) == script
    elsewhere = ["/usr/bin/python3", "/srv/other/__main__.py", "app:app"]
    assert reexec_argv(elsewhere, PACKAGE) == elsewhere
    assert reexec_argv(["/usr/bin/python3"], PACKAGE) == ["/usr/bin/python3"]


def state(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"size": 4, "workers": [], "worker_failure_count": 0}
    return {**base, **fields}


def test_ready_workers_counts_the_ones_that_passed_their_health_check() -> None:
    workers = [{"pid": 1, "phase": "ready"}, {"pid": 2, "phase": "booting"}, "junk"]
    assert ready_workers(state(workers=workers)) == (1, 4)
    assert ready_workers({"size": True, "workers": None}) == (0, 0)


def test_a_failed_report_of_a_new_worker_is_a_failed_new_set_with_its_reason() -> None:
    failures = [{"pid": 7, "stage": "health", "reason": "GET /healthz answered 500"}]
    problem = new_set_problem(
        state(worker_failure_count=1, worker_failures=failures), {"worker_failure_count": 0}
    )
    assert problem == "worker 7 of the new master failed at health: GET /healthz answered 500"
    assert new_set_problem(state(worker_failure_count=1), {"worker_failure_count": 1}) is None


def test_three_unexpected_exits_are_a_crash_loop_and_fewer_are_not() -> None:
    assert new_set_problem(state(worker_crash_count=2), {}) is None
    problem = new_set_problem(state(worker_crash_count=3), {})
    assert problem is not None and "crash loop" in problem
    assert new_set_problem(state(worker_crash_count="3"), {}) is None  # malformed: not counted


def test_every_phase_has_its_own_progress_line() -> None:
    lines = [
        describe({"t": 0.1, "event": "bluegreen.started", "new_master_pid": 42}),
        describe({"t": 0.2, "event": "bluegreen.healthy", "ready": 4, "size": 4}),
        describe({"t": 0.3, "event": "bluegreen.old_workers_stopped"}),
        describe({"t": 0.4, "event": "bluegreen.window_opened", "window_ends": 0}),
        describe(
            {
                "t": 0.5,
                "event": "bluegreen.old_master_quit",
                "old_master_pid": 41,
                "new_master_pid": 42,
            }
        ),
    ]
    assert "new master started, pid 42" in lines[0]
    assert "4/4 workers healthy" in lines[1]
    assert "old master is idle" in lines[2]
    assert "window open until 00:00:00 UTC" in lines[3]
    assert "old master 41 quit; master 42 serves alone" in lines[4]


def test_the_verdict_says_which_master_serves() -> None:
    info = {"old_master_pid": 41, "new_master_pid": 42}
    ok = verdict(DeployResult("deployed", "blue-green", blue_green=info))
    assert ok.startswith("OK: blue-green: master 42 serves the new code; the old master 41 quit")
    bad = verdict(DeployResult("refused", "blue-green", reason="worker 7 ...", blue_green=info))
    assert bad.startswith("REFUSED (blue-green): the old workers kept serving; the new master 42")
    assert bad.endswith("worker 7 ...")
    unknown = verdict(DeployResult("unknown", "blue-green", reason="still running"))
    assert unknown.startswith("UNKNOWN")


def test_status_shows_a_blue_green_in_its_window() -> None:
    record = {
        "id": 1,
        "phase": "window",
        "old_master_pid": 41,
        "new_master_pid": 42,
        "window_ends": 60.0,
    }
    text = describe_state(41, {"workers": [], "rolling": True, "blue_green": record})
    assert "blue-green 1 in progress (window): old master 41, new master 42" in text
    assert "window ends at 00:01:00 UTC" in text
    assert "hotpatch deploy --pid 41 --switch-back" in text
    new = describe_state(
        42,
        {"workers": [], "rolling": True, "parent_master_pid": 41, "parent_blue_green": record},
    )
    assert "new master of a blue-green started by master 41" in new
