"""Django under gunicorn with hotpatch's hooks: the example project, served for real, under load.

Each test copies ``examples/django_app`` to a temporary directory and starts a real gunicorn
master with the example's own config (sync workers, ``mysite.wsgi:application``) on a pre-bound
127.0.0.1 socket, runs client threads that count every request, changes the project on disk and
ships it: a rolling reload (good, then a view module that fails at import), an in-place
``hotpatch deploy`` of a view, a form and a template filter, and ``--strategy auto`` with changes
that only a rolling reload carries (a template, a URLconf, a model field). Every test checks zero
failed requests, the outcome and its reason, which version every worker answers, and the master.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotpatch.demo.harness import GunicornServer, assert_no_failures, wait_until
from hotpatch.demo.harness import Site as BaseSite
from hotpatch.gunicorn._client import read_state
from hotpatch.gunicorn._coordinator import DeployResult, deploy

pytest.importorskip("django", reason="django is not installed (the test extra installs it)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_app"
WORKERS = 2
ENV = {
    # Importing Django takes a second of CPU per worker on a loaded 2-core machine.
    "HOTPATCH_BOOT_TIMEOUT": "60",
    "HOTPATCH_HEALTH_TIMEOUT": "5",
    "HOTPATCH_SETTLE_TIME": "0.5",
}


class Site(BaseSite):
    """The Django example served from a copy of it, with the example's gunicorn.conf.py."""

    def start(self, **_: object) -> GunicornServer:  # type: ignore[override]
        self.server = GunicornServer(
            "mysite.wsgi:application",
            cwd=self.dir,
            workers=self.worker_count,
            config="gunicorn.conf.py",
            env=self.env,
        )
        self.server.wait_serving(workers=self.worker_count, timeout_s=120)
        wait_until(
            lambda: read_state(self.srv.pid) is not None,
            timeout_s=30,
            what="state.json",
            describe=self.srv.output,
        )
        self.wait_settled(self.state()["known_good"], timeout_s=60)
        return self.server

    def edit(self, relative: str, old: str, new: str) -> None:
        """Replace ``old`` by ``new`` in a file of the project, saved atomically as editors do."""
        path = self.dir / relative
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {relative}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text.replace(old, new), encoding="utf-8")
        tmp.replace(path)

    def wait_deployable(self) -> None:
        """Every worker ready on the known-good release, with its control socket open."""
        self.wait_settled(self.state()["known_good"], timeout_s=60)
        wait_until(
            lambda: all(w.get("listening") for w in self.workers()),
            timeout_s=30,
            what="every worker listening",
            describe=lambda: str(self.workers()),
        )

    def deploy(self, strategy: str) -> DeployResult:
        result = deploy(self.srv.pid, strategy=strategy, timeout_s=180)
        print(json.dumps(result.as_dict(), indent=1, default=str))
        return result

    def rollout(self, *, timeout_s: float = 180) -> dict[str, Any]:
        return super().rollout(timeout_s=timeout_s)

    def every_worker_answers(self, path: str, expected: str) -> None:
        """Requests to ``path``, 8 at a time, until every worker answered ``expected`` (bounded)."""
        self.versions_by_pid()  # every worker reached once (and answers "/")
        for _ in range(4 * WORKERS):
            assert self.srv.get(path) == (200, expected)


@pytest.fixture(name="site")
def _site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path / "django_app", workers=WORKERS, env=ENV)
    shutil.copytree(EXAMPLE, site.dir, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        yield site
    finally:
        site.close()


def test_a_good_rolling_reload_goes_live_and_a_view_that_fails_at_import_is_rolled_back(
    site: Site,
) -> None:
    site.start()
    assert site.srv.get("/hello/?name=ann") == (200, "<p>Hello, ann!</p>\n")
    site.start_load()
    site.edit("greet/views.py", 'VERSION = "1"', 'VERSION = "2"')
    shipped = site.rollout()
    assert shipped["outcome"] == "completed", shipped
    site.wait_settled(shipped["release"], timeout_s=60)
    assert set(site.versions_by_pid().values()) == {"2"}

    site.edit("greet/views.py", 'VERSION = "2"', 'VERSION = "3"\nfrom greet.missing import x')
    refused = site.rollout()
    site.wait_settled(shipped["release"], timeout_s=60)
    site.assert_master_alive()
    assert refused["outcome"] == "rolled_back", refused
    assert "views.py:11" in refused["reason"], refused["reason"]
    assert "No module named 'greet.missing'" in refused["reason"], refused["reason"]
    assert set(site.versions_by_pid().values()) == {"2"}
    stats = site.stop_load()
    assert_no_failures(stats)
    assert set(stats.bodies) <= {"version=1", "version=2"}, stats.bodies
    # A worker that dies now (SIGKILL: its request in flight, if any, is lost, so no load here)
    # comes back on the known-good release, not on the broken code on disk.
    site.kill_one_worker_and_check("2", shipped["release"], timeout_s=120)
    site.assert_master_alive()


def test_in_place_deploy_patches_a_view_a_form_and_a_template_filter_in_every_worker(
    site: Site,
) -> None:
    site.start()
    site.wait_deployable()
    before = site.srv.worker_pids()
    site.start_load()
    site.edit("greet/views.py", 'VERSION = "1"', 'VERSION = "2"')
    site.edit("greet/forms.py", ".strip()", ".strip().title()")
    site.edit("greet/templatetags/greet_tags.py", 'f"Hello, {name}!"', 'f"Hi there, {name}!"')
    result = site.deploy("in-place")
    assert result.outcome == "deployed", result.reason
    assert result.strategy == "in-place"
    assert site.srv.worker_pids() == before  # no worker restarted
    assert set(site.versions_by_pid().values()) == {"2"}
    site.every_worker_answers("/hello/?name=ann", "<p>Hi there, Ann!</p>\n")
    stats = site.stop_load()
    assert_no_failures(stats)
    assert site.state()["known_good"] == result.release
    site.assert_master_alive()


@pytest.mark.parametrize(
    ("relative", "old", "new", "why"),
    [
        pytest.param(
            "greet/templates/greet/hello.html",
            "<p>",
            "<p class=hi>",
            "greet/templates/greet/hello.html",
            id="template",
        ),
        pytest.param(
            "mysite/urls.py",
            '    path("healthz", views.healthz),\n',
            '    path("healthz", views.healthz),\n    path("hi/", views.hello),\n',
            "urlpatterns",
            id="urlconf",
        ),
        pytest.param(
            "greet/models.py",
            "max_length=40)",
            "max_length=40)\n    polite = models.BooleanField(default=True)",
            "ModelBase",
            id="model-field",
        ),
    ],
)
def test_auto_rolls_what_cannot_be_patched_in_place_and_says_why(
    site: Site, relative: str, old: str, new: str, why: str
) -> None:
    site.start()
    site.wait_deployable()
    before = site.srv.worker_pids()
    site.start_load()
    site.edit("greet/views.py", 'VERSION = "1"', 'VERSION = "2"')
    site.edit(relative, old, new)
    result = site.deploy("auto")
    stats = site.stop_load()
    assert result.outcome == "deployed", result.reason
    assert result.strategy == "rolling"
    assert why in result.reason, result.reason
    assert not set(site.srv.worker_pids()) & set(before)  # every worker was replaced
    assert set(site.versions_by_pid().values()) == {"2"}
    if relative.endswith(".html"):
        site.every_worker_answers("/hello/?name=ann", "<p class=hi>Hello, ann!</p>\n")
    if relative.endswith("urls.py"):
        site.every_worker_answers("/hi/?name=bo", "<p>Hello, bo!</p>\n")
    assert_no_failures(stats)
    site.assert_master_alive()
