"""The deploy's pure decisions and the version-2 protocol lines, without processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotpatch.control.protocol import BadRequest, Request, Step, parse_request, parse_step
from hotpatch.gunicorn._deploy import (
    begin_problem,
    changed_files,
    committed,
    phase_verdict,
    switch_problem,
)
from hotpatch.gunicorn._releases import Record
from hotpatch.gunicorn._state import prepare_state_dir, take_requests, write_request


def rec(kind: str, digest: str) -> Record:
    return Record(kind, digest, 1, 1, 1)


READY = {1: ("r0", "ready"), 2: ("r0", "ready")}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"disabled_reason": "preload"}, "preload"),
        ({"rollout_id": 3}, "rollout 3 is running"),
        ({"deploy_id": 2}, "deploy 2 is running"),
        ({"known_good": None}, "no known-good release"),
        ({"size": 3}, "2 workers run where 3 are configured"),
        ({"workers": {1: ("r0", "ready"), 2: ("r1", "ready")}}, "worker 2 runs release r1"),
        ({"workers": {1: ("r0", "booting"), 2: ("r0", "ready")}}, "worker 1 is booting"),
    ],
)
def test_a_deploy_begins_only_on_a_settled_server(
    changes: dict[str, object], expected: str | None
) -> None:
    arguments: dict[str, object] = {
        "disabled_reason": None,
        "rollout_id": None,
        "deploy_id": None,
        "workers": READY,
        "known_good": "r0",
        "size": 2,
        **changes,
    }
    problem = begin_problem(**arguments)  # type: ignore[arg-type]
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


def test_changed_files_splits_python_from_everything_else() -> None:
    old = {
        b"app.py": rec("F", "a"),
        b"same.py": rec("F", "s"),
        b"templates": rec("D", ""),
        b"templates/x.html": rec("F", "t"),
        b"gone.py": rec("F", "g"),
    }
    new = {
        b"app.py": rec("F", "b"),
        b"same.py": rec("F", "s"),
        b"templates": rec("D", ""),
        b"templates/x.html": rec("F", "t2"),
        b"new.py": rec("F", "n"),
        b"link.py": rec("L", "0a"),
        b"empty": rec("D", ""),
    }
    python, other = changed_files(old, new)
    assert python == ["app.py", "gone.py", "new.py"]
    assert other == ["link.py", "templates/x.html"]
    assert changed_files(old, old) == ([], [])


def test_the_switch_needs_exactly_the_workers_that_began() -> None:
    assert switch_problem({1: "r0", 2: "r0"}, {1: "r0", 2: "r0"}) is None
    started = switch_problem({1: "r0", 2: "r0"}, {1: "r0", 2: "r0", 3: "r0"})
    assert started is not None and "worker 3 started during the deploy" in started
    gone = switch_problem({1: "r0", 2: "r0"}, {1: "r0"})
    assert gone is not None and "worker 2 exited" in gone
    moved = switch_problem({1: "r0"}, {1: "r1"})
    assert moved is not None and "worker 1 now runs release r1" in moved


def test_a_phase_passes_only_when_every_worker_succeeded() -> None:
    ok = phase_verdict("prepare", {1: {"outcome": "accepted"}, 2: {"outcome": "unchanged"}})
    assert ok.ok and ok.reason == ""
    bad = phase_verdict(
        "commit",
        {
            1: {"outcome": "committed"},
            2: {"outcome": "refused", "message": "app.py line 3 (stage: compatibility)"},
            3: {"outcome": "unknown", "unknown": True, "message": "no answer within 5s"},
        },
    )
    assert not bad.ok
    assert bad.reason.startswith("worker 2: refused: app.py line 3")
    assert "(and 1 more)" in bad.reason
    assert bad.unknown == (3,)
    assert committed(
        {1: {"outcome": "committed"}, 2: {"outcome": "refused"}, 3: {"unknown": True}}
    ) == [1, 3]


def test_deploy_requests_and_steps_round_trip() -> None:
    request = Request(
        "deploy", 7, deploy_id="3", release="d3-abc", release_dir="/r/d3-abc", expires_ms=5000
    )
    assert parse_request(request.encode()[:-1]) == request
    assert parse_step(Step("commit", "3").encode()[:-1]) == Step("commit", "3")
    assert parse_request(Request("status", 7).encode()[:-1]) == Request("status", 7)
    assert b'"v":1' in Request("patch", 7).encode()  # old requests keep version 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"v": 1, "action": "deploy", "pid": 1}', "needs protocol version 2"),
        (b'{"v": 2, "action": "deploy", "pid": 1}', "deploy needs field 'deploy_id'"),
        (
            b'{"v": 2, "action": "deploy", "pid": 1, "deploy_id": "1", "release": "d1", '
            b'"release_dir": "/x/d1", "expires_ms": 0}',
            "expires_ms",
        ),
        (b'{"v": 2, "action": "patch", "pid": 1, "release": "d1"}', "belongs to action 'deploy'"),
        (b'{"v": 2, "action": "status", "pid": 1, "deploy_id": {"a": 1}}', "must be str"),
    ],
)
def test_malformed_deploy_requests_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"v": 2, "step": "launch", "deploy_id": "1"}', "unknown step"),
        (b'{"v": 1, "step": "commit", "deploy_id": "1"}', "needs protocol version 2"),
        (b'{"v": 2, "step": "commit"}', "'deploy_id' is required"),
        (b'{"v": 2, "step": "commit", "deploy_id": "1", "x": 1}', "unknown field 'x'"),
        (b"[" * 10_000, "nested deeper"),
    ],
)
def test_malformed_steps_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_step(line)


def test_master_requests_are_read_once_and_hostile_files_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    prepare_state_dir(state)
    token = "a" * 32
    write_request(state, token, {"op": "begin", "timeout_s": 5})
    (state / "requests" / ("b" * 32 + ".json")).write_text("[1, 2]")
    (state / "requests" / ("c" * 32 + ".json")).symlink_to(tmp_path / "elsewhere")
    (state / "requests" / ("d" * 32 + ".json")).write_bytes(b"{" * 20_000)
    (state / "requests" / "not-a-token.json").write_text("{}")
    taken = dict(take_requests(state))
    assert taken[token] == {"op": "begin", "timeout_s": 5}
    assert taken["b" * 32] == "not a JSON object"
    assert "unreadable request" in str(taken["c" * 32])
    assert "unreadable request" in str(taken["d" * 32])  # larger than the cap
    assert "not-a-token" not in " ".join(taken)
    assert take_requests(state) == []  # each is read once
    with pytest.raises(ValueError, match="not a request token"):
        write_request(state, "../x", {})
    (state / "requests").chmod(0o755)
    with pytest.raises(PermissionError):
        write_request(state, token, {})
