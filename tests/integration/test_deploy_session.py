"""One process's deploy session through its real control socket, with a misbehaving coordinator.

The listener runs in this test process (``listen_release`` on a release directory holding a real
module); the test is the coordinator, speaking the protocol over the Unix socket: it hangs up
after the commit, sends garbage, names a directory outside the releases, or never sends the next
step. Each time the module must end exactly as it was, or as confirmed.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.control.client import DeploySession
from hotpatch.control.server import Listener, listen, listen_release, socket_name
from hotpatch.control.session import ReleaseHooks
from hotpatch.demo.harness import wait_until
from hotpatch.engine import Engine

_COUNTER = itertools.count()
SOURCE = "VERSION = {version!r}\n\n\ndef answer():\n    return VERSION\n"


class Release:
    def __init__(self, root: Path) -> None:
        self.name = f"deploy_session_mod_{next(_COUNTER)}"
        self.root = root / "releases"
        self.r0 = self.root / "r0-aaaa"
        self.d1 = self.root / "d1-bbbb"
        for directory, version in ((self.r0, "v1"), (self.d1, "v2")):
            directory.mkdir(parents=True)
            (directory / f"{self.name}.py").write_text(SOURCE.format(version=version))
        sys.path.insert(0, str(self.r0))
        self.module = importlib.import_module(self.name)
        self.switched: list[tuple[str, str]] = []
        self.health: str | None = None

    def answer(self) -> str:
        return str(self.module.answer())

    def close(self) -> None:
        sys.path.remove(str(self.r0))
        sys.modules.pop(self.name, None)


@pytest.fixture(name="release")
def _release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Release, Listener]]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("HOTPATCH_RUNTIME_DIR", str(run))
    release = Release(tmp_path)
    listener = listen_release(
        ReleaseHooks(
            release="r0-aaaa",
            release_dir=str(release.r0),
            health=lambda: release.health,
            switched=lambda r, d: release.switched.append((r, d)),
        ),
        engine=Engine(),
    )
    try:
        yield release, listener
    finally:
        listener.close()
        release.close()


def session(
    release: Release, *, release_dir: Path | None = None, expires_s: float = 30.0
) -> DeploySession:
    target = release_dir or release.d1
    return DeploySession(
        os.getpid(),
        deploy_id="1",
        release=target.name,
        release_dir=str(target),
        expires_s=expires_s,
    )


def test_a_confirmed_deploy_keeps_the_new_code(release: tuple[Release, Listener]) -> None:
    rel, _ = release
    s = session(rel)
    try:
        assert s.open(timeout_s=10)["outcome"] == "accepted"
        assert rel.answer() == "v1"  # phase 1 changes nothing
        assert s.step("commit", timeout_s=10)["outcome"] == "committed"
        assert rel.answer() == "v2"
        assert s.step("health", timeout_s=10)["outcome"] == "healthy"
        assert s.step("confirm", timeout_s=10)["outcome"] == "deployed"
    finally:
        s.close()
    assert rel.answer() == "v2"
    assert rel.switched == [("d1-bbbb", str(rel.d1))]


def test_a_coordinator_that_hangs_up_after_the_commit_gets_a_rollback(
    release: tuple[Release, Listener],
) -> None:
    rel, listener = release
    s = session(rel)
    assert s.open(timeout_s=10)["outcome"] == "accepted"
    assert s.step("commit", timeout_s=10)["outcome"] == "committed"
    assert rel.answer() == "v2"
    s.close()  # the coordinator dies between phase 2 and phase 3
    wait_until(lambda: rel.answer() == "v1", timeout_s=10, what="the rollback after the hang-up")
    wait_until(lambda: len(rel.switched) == 2, timeout_s=10, what="sys.path moved back")
    assert rel.switched[-1] == ("r0-aaaa", str(rel.r0))
    live = [v for v in listener.engine.history(rel.name) if v.is_live]
    assert live and live[0].outcome != "applied"  # the version live is the one before the deploy


def test_an_unhealthy_process_still_waits_for_the_coordinator_and_rolls_back(
    release: tuple[Release, Listener],
) -> None:
    rel, _ = release
    rel.health = "GET /healthz answered 500 (stage: health)"
    s = session(rel)
    try:
        s.open(timeout_s=10)
        s.step("commit", timeout_s=10)
        health = s.step("health", timeout_s=10)
        assert health["outcome"] == "unhealthy" and "500" in health["message"]
        assert rel.answer() == "v2"  # the coordinator decides
        assert s.step("rollback", timeout_s=10)["outcome"] == "rolled_back"
    finally:
        s.close()
    assert rel.answer() == "v1"


def raw_session(
    rel: Release, lines: list[bytes], *, expires_ms: int = 30_000
) -> list[dict[str, Any]]:
    """Send the request, then ``lines`` one by one; every answer line until the server closes."""
    pid = os.getpid()
    path = Path(os.environ["HOTPATCH_RUNTIME_DIR"]) / socket_name(pid)
    request = {
        "v": 2,
        "action": "deploy",
        "pid": pid,
        "deploy_id": "9",
        "release": rel.d1.name,
        "release_dir": str(rel.d1),
        "expires_ms": expires_ms,
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        for line in lines:
            sock.sendall(line)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines() if x.strip()]


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([b'{"v": 2, "step": "commit", "deploy_id": "8"}\n'], "a step for deploy '8'"),
        ([b'{"v": 2, "step": "launch", "deploy_id": "9"}\n'], "unknown step"),
        ([b"\xff\xfe not json\n"], "not UTF-8"),
        ([b'{"v": 2, "step": "health", "deploy_id": "9"}\n'], "'health' came where 'commit'"),
        ([b"[" * 100_000 + b"\n"], "longer than"),
    ],
)
def test_a_bad_step_before_the_commit_discards_everything(
    release: tuple[Release, Listener], lines: list[bytes], why: str
) -> None:
    rel, _ = release
    answers = raw_session(rel, lines)
    assert [a.get("phase") for a in answers if "phase" in a] == ["prepare", "abort"]
    assert answers[-1]["outcome"] == "discarded" and why in answers[-1]["message"]
    assert rel.answer() == "v1"
    assert rel.switched == []


def test_a_bad_step_after_the_commit_rolls_back(release: tuple[Release, Listener]) -> None:
    rel, _ = release
    answers = raw_session(
        rel, [b'{"v": 2, "step": "commit", "deploy_id": "9"}\n', b'{"v": 2, "oops": 1}\n']
    )
    assert [a.get("outcome") for a in answers if "phase" in a] == [
        "accepted",
        "committed",
        "rolled_back",
    ]
    assert rel.answer() == "v1"


def test_no_next_step_before_the_expiry_discards(release: tuple[Release, Listener]) -> None:
    rel, _ = release
    answers = raw_session(rel, [], expires_ms=300)
    assert answers[-1]["outcome"] == "discarded"
    assert "before the deploy's expiry" in answers[-1]["message"]
    assert rel.answer() == "v1"


def test_a_directory_that_is_not_a_sibling_release_is_refused(
    release: tuple[Release, Listener], tmp_path: Path
) -> None:
    rel, _ = release
    elsewhere = tmp_path / "elsewhere" / "d1-bbbb"
    elsewhere.mkdir(parents=True)
    (elsewhere / f"{rel.name}.py").write_text(SOURCE.format(version="evil"))
    s = session(rel, release_dir=elsewhere)
    try:
        answer = s.open(timeout_s=10)
    finally:
        s.close()
    assert answer["outcome"] == "refused"
    assert "is not a release of this server's master" in answer["message"]
    link = rel.root / "d2-link"
    link.symlink_to(elsewhere)
    s = session(rel, release_dir=link)
    try:
        answer = s.open(timeout_s=10)
    finally:
        s.close()
    assert answer["outcome"] == "refused" and "not a directory" in answer["message"]
    assert rel.answer() == "v1"


def test_a_module_missing_from_the_new_release_is_refused(
    release: tuple[Release, Listener],
) -> None:
    rel, _ = release
    (rel.d1 / f"{rel.name}.py").unlink()
    s = session(rel)
    try:
        answer = s.open(timeout_s=10)
    finally:
        s.close()
    assert answer["outcome"] == "refused"
    assert "not in release d1-bbbb" in answer["message"] and "rolling" in answer["message"]


def test_a_process_that_already_listens_takes_deploys_on_the_same_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("HOTPATCH_RUNTIME_DIR", str(run))
    rel = Release(tmp_path)
    own = listen(["json"], engine=Engine())  # the app's own call, at import time
    try:
        hooks = ReleaseHooks(
            release="r0-aaaa",
            release_dir=str(rel.r0),
            health=lambda: None,
            switched=lambda r, d: rel.switched.append((r, d)),
        )
        assert listen_release(hooks) is own
        assert rel.name in own.listened() and "json" in own.listened()
        s = session(rel)
        try:
            assert s.open(timeout_s=10)["outcome"] == "accepted"
            assert s.step("commit", timeout_s=10)["outcome"] == "committed"
            assert s.step("confirm", timeout_s=10)["outcome"] == "deployed"
        finally:
            s.close()
        assert rel.answer() == "v2"
    finally:
        own.close()
        rel.close()


def test_a_release_listener_builds_the_engines_index_before_it_answers(
    release: tuple[Release, Listener],
) -> None:
    """The one-time index of the loaded modules is built when a worker starts listening (before
    it reports ``listening``), not by the first deploy's commit."""
    _, listener = release
    index = listener.engine._namespace_ids
    assert index._modules_seen != (-1, -1), "the index was never built"
    assert len(index._state) > 10  # every loaded module's namespace, not only the release's
