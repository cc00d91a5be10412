"""examples/kubernetes/deploy-all-pods.sh against real gunicorn "pods" under load.

There is no cluster here, so each pod is simulated the way the Deployment lays it out: gunicorn
started with the Deployment's own command line and ``HOTPATCH_*`` settings, its app directory, its
``/tmp`` and its ``/dev/shm`` each a directory of mode 0777 (as an ``emptyDir``), no home
directory, no runtime directory configured (hotpatch makes ``<tmp>/hotpatch-<uid>`` itself). The
one stand-in is ``kubectl``: a small script that runs ``kubectl exec POD -- CMD`` as ``CMD`` in that
pod's environment with the pod's paths (``/srv/app``, ``/tmp/...``) mapped to its directories, and
answers ``kubectl get pods`` with the pod names. Everything else (the script, ``hotpatch deploy``,
the hooks, gunicorn, HTTP) is the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from hotpatch.demo.harness import GunicornServer, LoadGenerator, assert_no_failures, wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "kubernetes"
SCRIPT = EXAMPLE / "deploy-all-pods.sh"
PODS = ("pod-a", "pod-b")
# Settings of the metrics extra: a port per pod would collide here (and needs the extra).
LEFT_OUT = {"HOTPATCH_METRICS_PORT", "HOTPATCH_METRICS_ADDR", "HOTPATCH_METRICS_PATH"}

KUBECTL = r"""#!/usr/bin/env bash
# kubectl stand-in: `get pods` lists $SIM_PODS; `exec [-i] POD [-c C] -- CMD...` runs CMD in POD's
# environment, with arguments under the pod's /srv/app and /tmp/ mapped to its directories.
set -u
while [ "${1:-}" = --namespace ]; do shift 2; done
case "$1" in
  get) printf '%s\n' $SIM_PODS; exit 0 ;;
  exec)
    shift; stdin=0
    if [ "$1" = -i ]; then stdin=1; shift; fi
    pod=$1; shift
    dir="$SIM_ROOT/$pod"
    [ -d "$dir" ] || { echo "Error from server (NotFound): pods \"$pod\" not found" >&2; exit 1; }
    while [ "$1" != -- ]; do shift; done; shift
    args=()
    for a in "$@"; do
      case "$a" in
        /srv/app*) a="$dir/app${a#/srv/app}" ;;
        /tmp/*) a="$dir/tmp/${a#/tmp/}" ;;
      esac
      args+=("$a")
    done
    [ "$stdin" = 1 ] || exec </dev/null
    cd /
    exec env HOME=/nonexistent TMPDIR="$dir/tmp" XDG_RUNTIME_DIR= XDG_STATE_HOME= \
      HOTPATCH_RUNTIME_DIR= HOSTNAME="$pod" "${args[@]}" ;;
esac
echo "kubectl stand-in: unsupported: $*" >&2
exit 1
"""


def deployment_container() -> dict[str, object]:
    (doc,) = yaml.safe_load_all((EXAMPLE / "deployment.yaml").read_text())
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def pod_command(pod_dir: Path) -> list[str]:
    """The Deployment's gunicorn arguments with the pod's paths; the bind is the harness's."""
    command = deployment_container()["command"]
    assert isinstance(command, list) and command[0] == "gunicorn"
    args: list[str] = []
    rest = iter(command[1:-1])  # the app (last) is the harness's argument
    for arg in rest:
        if arg == "--bind":
            next(rest)
            continue
        mapped = arg
        for inside, outside in (("/srv/app", "app"), ("/tmp", "tmp"), ("/dev/shm", "shm")):
            if arg == inside or arg.startswith(f"{inside}/"):
                mapped = str(pod_dir / outside) + arg.removeprefix(inside)
                break
        args.append(mapped)
    return args


def pod_env(pod: str, pod_dir: Path) -> dict[str, str]:
    env = deployment_container()["env"]
    assert isinstance(env, list)
    settings = {e["name"]: e["value"] for e in env if e["name"] not in LEFT_OUT}
    return {
        **settings,
        "HOME": "/nonexistent",
        "TMPDIR": str(pod_dir / "tmp"),
        "XDG_RUNTIME_DIR": "",
        "XDG_STATE_HOME": "",
        "HOTPATCH_RUNTIME_DIR": "",
        "HOSTNAME": pod,
    }


class Pod:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.dir = root / name
        for sub in ("tmp", "app", "shm"):
            (self.dir / sub).mkdir(parents=True)
            (self.dir / sub).chmod(0o777)  # an emptyDir's mode
        shutil.copytree(EXAMPLE / "app", self.dir / "app", dirs_exist_ok=True)  # the init container
        command = pod_command(self.dir)
        app = deployment_container()["command"]
        assert isinstance(app, list)
        self.server = GunicornServer(
            app[-1],
            cwd=self.dir / "app",
            workers=int(command[command.index("--workers") + 1]),
            config=None,
            extra_args=command,
            env=pod_env(name, self.dir),
        )

    def answers(self, *, timeout_s: float = 30.0) -> dict[int, str]:
        """worker pid -> version, until every live worker answered (bounded)."""
        seen: dict[int, str] = {}
        with ThreadPoolExecutor(max_workers=8) as pool:

            def every_worker_answered() -> bool:
                for status, body in pool.map(lambda _: self.server.get("/"), range(8)):
                    assert status == 200, body
                    # "hello from version 2 (pod pod-a, worker 1234)"
                    version = body.split("version ", 1)[1].split()[0]
                    seen[int(body.rsplit("worker ", 1)[1].rstrip(")\n"))] = version
                return set(self.server.worker_pids()) <= set(seen)

            wait_until(every_worker_answered, timeout_s=timeout_s, what=f"{self.name}: answers")
        live = set(self.server.worker_pids())
        return {pid: v for pid, v in seen.items() if pid in live}


@pytest.fixture(name="pods")
def _pods(tmp_path: Path) -> Iterator[list[Pod]]:
    pods: list[Pod] = []
    try:
        for name in PODS:
            pods.append(Pod(name, tmp_path))
        for pod in pods:
            pod.server.wait_serving(workers=4, timeout_s=60)
            wait_until(
                lambda pod=pod: pod.server.output().count("control.listening") >= 4,
                timeout_s=60,
                what=f"{pod.name}: every worker listening",
            )
        yield pods
    finally:
        for pod in pods:
            pod.server.stop()
            print(f"---- {pod.name} ----\n{pod.server.output()[-20000:]}")
            pod.server.close_log()


def run_script(tmp_path: Path, fix_dir: Path, *files: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(KUBECTL)
    kubectl.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "SIM_ROOT": str(tmp_path),
        "SIM_PODS": " ".join(PODS),
    }
    return subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "-l",
            "app.kubernetes.io/name=hotpatch-example",
            "--from",
            str(fix_dir),
            *files,
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_a_fix_reaches_every_pod_in_place_and_a_refused_one_changes_nothing(
    pods: list[Pod], tmp_path: Path
) -> None:
    loads = [LoadGenerator(pod.server.port, clients=3).start() for pod in pods]
    try:
        before = {pod.name: pod.answers() for pod in pods}
        assert all(set(a.values()) == {"1"} for a in before.values()), before

        fix = tmp_path / "fix"
        fix.mkdir()
        good = (EXAMPLE / "app" / "app.py").read_text().replace('VERSION = "1"', 'VERSION = "2"')
        (fix / "app.py").write_text(good)
        run = run_script(tmp_path, fix, "app.py")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "every pod deployed: pod-a pod-b" in run.stdout
        for pod in pods:
            after = pod.answers()
            assert set(after.values()) == {"2"}, (pod.name, after)
            assert set(after) == set(before[pod.name]), "a worker restarted"
            assert (pod.dir / "app" / "app.py").read_text() == good
            assert not list((pod.dir / "app").glob("*.hotpatch.*")), "a backup or temporary left"

        (fix / "app.py").write_text(good + "\ndef broken(:\n")
        run = run_script(tmp_path, fix, "app.py")
        assert run.returncode == 1, run.stdout + run.stderr
        assert "pod-a: refused or rolled back" in run.stderr
        assert "pod-b" not in run.stdout.split("pods:", 1)[1].split("\n", 1)[1], "pod-b was tried"
        for pod in pods:
            assert set(pod.answers().values()) == {"2"}, pod.name
            assert (pod.dir / "app" / "app.py").read_text() == good, f"{pod.name}: not restored"
            assert not list((pod.dir / "app").glob("*.hotpatch.*"))
    finally:
        stats = [load.stop() for load in loads]
    for s in stats:
        assert_no_failures(s)


def test_a_missing_or_escaping_file_is_a_usage_error(tmp_path: Path) -> None:
    fix = tmp_path / "fix"
    fix.mkdir()
    run = run_script(tmp_path, fix, "app.py")
    assert run.returncode == 2 and "not a regular file" in run.stderr
    (fix / "app.py").write_text("VERSION = 1\n")
    run = run_script(tmp_path, fix, "../app.py")
    assert run.returncode == 2 and "relative path inside the app directory" in run.stderr
