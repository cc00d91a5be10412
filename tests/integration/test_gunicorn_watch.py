"""Watch mode of the gunicorn hook (``HOTPATCH_WATCH=1``) with real gunicorn masters, under load.

Each test starts gunicorn (4 sync workers, hotpatch's hooks, watch mode on) in its own session on
a pre-bound 127.0.0.1 socket, runs client threads that count every request, saves ``app.py`` the
way editors do, and checks: zero failed requests, the rollout the save started, which version
answers, and that the master is alive. No test sends SIGHUP: every rollout here is the watcher's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import (
    GunicornServer,
    LoadStats,
    Site,
    assert_no_failures,
    wait_until,
)
from hotpatch.gunicorn._client import wait_for_rollout

APPS = Path(__file__).resolve().parents[1] / "apps"
WORKERS = 4
ENV = {
    "HOTPATCH_WATCH": "1",
    "HOTPATCH_WATCH_INTERVAL": "0.25",
    "HOTPATCH_HEALTH_PATH": "/healthz",
    "HOTPATCH_BOOT_TIMEOUT": "5",
    "HOTPATCH_HEALTH_TIMEOUT": "2",
    "HOTPATCH_SETTLE_TIME": "0.5",
}
ROLLOUT_TIMEOUT_S = 60


def app_source(variant: str, version: str) -> str:
    return (APPS / variant).read_text(encoding="utf-8").replace("__VERSION__", version)


def save_by_rename(directory: Path, variant: str, version: str) -> None:
    """Write a temporary file and rename it over app.py (the "safe write" of many editors)."""
    tmp = directory / ".app.py.tmp-save"
    tmp.write_text(app_source(variant, version), encoding="utf-8")
    tmp.replace(directory / "app.py")


def save_in_place(directory: Path, variant: str, version: str) -> None:
    """Truncate and rewrite app.py in place (nano, VS Code)."""
    with (directory / "app.py").open("w", encoding="utf-8") as f:
        f.write(app_source(variant, version))


class WatchedSite(Site):
    """One gunicorn master in watch mode serving ``app.py`` from a temporary directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, workers=WORKERS, env=ENV)

    def start(  # type: ignore[override]
        self, *, extra_args: tuple[str, ...] = (), workers: int = WORKERS
    ) -> GunicornServer:
        save_by_rename(self.dir, "good.py", "v1")
        return super().start(extra_args=extra_args, workers=workers)

    def watch(self) -> dict[str, Any]:
        return dict(self.state().get("watch") or {})

    def next_rollout_id(self) -> int:
        return int(self.state()["next_rollout_id"])

    def wait_rollout(self, rollout_id: int) -> dict[str, Any]:
        """The record of rollout ``rollout_id``, which a save (not a SIGHUP) must start."""
        return wait_for_rollout(self.srv.pid, rollout_id, timeout_s=ROLLOUT_TIMEOUT_S)

    def versions(self, *, requests: int = 40) -> set[str]:
        seen = set()
        for _ in range(requests):
            status, body = self.srv.get("/")
            assert status == 200, body
            seen.add(body.split()[0].split("=")[1])
        return seen


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[WatchedSite]:
    site = WatchedSite(tmp_path / "app")
    site.dir.mkdir()
    try:
        yield site
    finally:
        site.close()


def last_answer_of(stats: LoadStats, version: str) -> float:
    return max(t for t, v in stats.answers if v == f"version={version}")


@pytest.mark.parametrize("save", [save_by_rename, save_in_place], ids=["rename", "in-place"])
def test_a_saved_good_change_reaches_every_worker(site: WatchedSite, save: Any) -> None:
    site.start()
    assert site.watch()["enabled"] is True
    site.start_load()
    rollout_id = site.next_rollout_id()
    saved_at = time.monotonic()
    save(site.dir, "good.py", "v2")
    record = site.wait_rollout(rollout_id)
    observed_at = time.monotonic()
    assert record["outcome"] == "completed", record
    site.wait_settled(record["release"])
    stats = site.stop_load()
    assert_no_failures(stats)
    assert site.versions() == {"v2"}
    assert site.watch()["last_changed"] == ["app.py"]
    assert "watch.change_detected" in site.srv.output()
    # Save-to-new figures (printed for docs/gunicorn.md; -s shows them).
    print(
        f"save -> last v1 answer: {last_answer_of(stats, 'v1') - saved_at:.2f} s; "
        f"save -> rollout completed seen: {observed_at - saved_at:.2f} s "
        f"(rollout {record['duration_s']} s incl. 0.5 s settle)"
    )


def test_a_broken_save_is_rolled_back_and_the_fix_rolls_out(site: WatchedSite) -> None:
    site.start()
    known_good = site.state()["known_good"]
    site.start_load()
    broken_id = site.next_rollout_id()
    save_by_rename(site.dir, "syntax_error.py.txt", "v2")
    record = site.wait_rollout(broken_id)
    assert record["outcome"] == "rolled_back", record
    assert "app.py:6: SyntaxError" in record["reason"], record
    site.wait_settled(known_good)
    site.assert_master_alive()
    assert site.versions() == {"v1"}
    save_in_place(site.dir, "good.py", "v3")
    fixed = site.wait_rollout(broken_id + 1)
    stats = site.stop_load()
    assert fixed["outcome"] == "completed", fixed
    site.wait_settled(fixed["release"])
    assert site.versions() == {"v3"}
    assert_no_failures(stats)
    site.assert_master_alive()


def test_touches_pycache_and_swap_files_start_no_rollout(site: WatchedSite) -> None:
    site.start()
    site.start_load()
    first_id = site.next_rollout_id()
    app = site.dir / "app.py"

    # A touch: the watcher notices the new mtime, compares the content and does nothing. The
    # positive signal that it looked is its "changes_ignored" counter, so no fixed wait is needed.
    os.utime(app)
    wait_until(
        lambda: site.watch().get("changes_ignored") == 1,
        timeout_s=10,
        what="the watcher to skip the touch",
        describe=lambda: str(site.state()),
    )
    assert site.watch()["last_ignored"] == ["app.py"]
    assert site.next_rollout_id() == first_id and site.state()["rollout"] is None

    # Files the watcher must never look at, then a touch as the positive control: any scan that
    # sees the control also sees the files written before it, so if they were watched they would
    # be in this batch or in an earlier one (which would bump a counter too).
    (site.dir / "__pycache__").mkdir(exist_ok=True)
    (site.dir / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0" * 64)
    (site.dir / "__pycache__" / "stray.py").write_text("x = 1\n", encoding="utf-8")
    (site.dir / ".app.py.swp").write_bytes(b"swap")
    (site.dir / "app.py~").write_text("backup\n", encoding="utf-8")
    os.utime(app)
    wait_until(
        lambda: site.watch().get("changes_ignored") == 2,
        timeout_s=10,
        what="the watcher to skip the control touch",
        describe=lambda: str(site.state()),
    )
    watch = site.watch()
    assert watch["last_ignored"] == ["app.py"], watch
    assert watch["rollouts_requested"] == 0, watch
    assert site.next_rollout_id() == first_id and site.state()["rollout"] is None

    # And a real change still rolls out, as rollout number first_id (none was used meanwhile).
    save_by_rename(site.dir, "good.py", "v2")
    record = site.wait_rollout(first_id)
    stats = site.stop_load()
    assert record["outcome"] == "completed", record
    assert site.watch()["rollouts_requested"] == 1
    site.wait_settled(record["release"])
    assert site.versions() == {"v2"}
    assert_no_failures(stats)


def test_watch_is_refused_with_preload_and_warns_with_gunicorn_reload(tmp_path: Path) -> None:
    for name, extra in (("preload", ("--preload",)), ("reload", ("--reload",))):
        site = WatchedSite(tmp_path / name)
        site.dir.mkdir()
        try:
            site.start(extra_args=extra, workers=1)
            output = site.srv.output()
            watch = site.watch()
            if name == "preload":
                assert watch["enabled"] is False and "preload_app" in watch["disabled_reason"]
                assert "watch.disabled" in output and "watch.started" not in output
            else:
                assert watch["enabled"] is True
                assert "watch.gunicorn_reload_detected" in output and "drop --reload" in output
        finally:
            site.close()
