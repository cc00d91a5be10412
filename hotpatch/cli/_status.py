"""``hotpatch status``: a gunicorn master's workers, their releases and patch versions, the last
rollout and deploy, and any deploy in progress.

The master's state says which release each worker was started from (or deployed to); each worker
is also asked through its own control socket (``status``, at most ``WORKER_TIMEOUT_S`` each) for
the release it runs and the versions of its patched modules. A worker that cannot be asked is
shown as such, never guessed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import Any

from hotpatch.cli._rollout import add_master_arguments, master_pid
from hotpatch.control.client import send_request
from hotpatch.errors import HotpatchError
from hotpatch.gunicorn._client import load_state, read_state

NAME = "status"
HELP = (
    "show a gunicorn master's workers (release, patched modules), the last rollout and deploy, "
    "and any deploy or blue-green switch in progress"
)
WORKER_TIMEOUT_S = 2.0


def ask_workers(state: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each worker's own ``status`` answer (or ``{"unreachable": reason}``), by pid."""
    answers: dict[int, dict[str, Any]] = {}
    for worker in state.get("workers") or []:
        pid = worker.get("pid") if isinstance(worker, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            continue
        try:
            answers[pid] = send_request(pid, "status", timeout_s=WORKER_TIMEOUT_S)
        except HotpatchError as exc:
            answers[pid] = {"unreachable": str(exc)}
    return answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_master_arguments(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the raw state as JSON (with each worker's own answer under worker_status)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        pid = master_pid(args)
        state = load_state(pid, args.state_dir)
    except HotpatchError as exc:
        print(f"hotpatch status: {exc}", file=sys.stderr)
        return 2
    live = ask_workers(state)
    parent = state.get("parent_master_pid")
    if isinstance(parent, int) and not isinstance(parent, bool) and parent > 0:
        # a blue-green's new master: its old master runs the switch and holds the record
        old_state = read_state(parent, args.state_dir)
        if old_state is not None:
            state = {**state, "parent_blue_green": old_state.get("blue_green")}
    if args.json:
        state = {**state, "worker_status": {str(k): v for k, v in live.items()}}
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    try:
        text = describe_state(pid, state, live)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        print(
            f"hotpatch status: master {pid}: its state is malformed ({type(exc).__name__}: "
            f"{exc}); `--json` shows it as it is",
            file=sys.stderr,
        )
        return 2
    print(text, end="")
    return 0


def describe_state(
    pid: int, state: dict[str, Any], live: dict[int, dict[str, Any]] | None = None
) -> str:
    """The state as lines of text.

    Raises:
        TypeError, ValueError, KeyError, AttributeError: a field is not what the master writes.
    """
    out = io.StringIO()

    def emit(line: str) -> None:
        out.write(line + "\n")

    emit(
        f"gunicorn master {pid}: known-good release {state.get('known_good')}, "
        f"{state.get('size')} workers, app {state.get('app_dir')}"
    )
    damaged = state.get("damaged_releases") or {}
    for release, reason in sorted(damaged.items()):
        if release == state.get("known_good"):
            emit(
                f"known-good release {release} is DAMAGED: new workers cannot start until a "
                f"rollout succeeds ({reason})"
            )
        else:
            emit(f"release {release} is damaged: {reason}")
    if not state.get("rolling"):
        emit(f"rolling reload DISABLED: {state.get('disabled_reason')}")
    for worker in state.get("workers", []):
        line = f"  worker {int(worker['pid']):>7}  {worker.get('release')}  {worker.get('phase')}"
        answer = (live or {}).get(int(worker["pid"]))
        if answer is not None:
            line += "  " + _describe_worker(answer)
        emit(line)
    _describe_blue_green(pid, state, emit)
    deploy = state.get("deploy")
    if deploy:
        emit(
            f"deploy {deploy.get('id')} in progress ({deploy.get('strategy')}, phase "
            f"{deploy.get('phase')}) to {deploy.get('release')}"
        )
    last_deploy = state.get("last_deploy")
    if last_deploy:
        line = f"last deploy {last_deploy.get('id')}: {last_deploy.get('outcome')}"
        line += f" ({last_deploy.get('strategy')}) of {last_deploy.get('release')}"
        if last_deploy.get("reason"):
            line += f": {last_deploy['reason']}"
        emit(line)
    current = state.get("rollout")
    if current:
        emit(
            f"rollout {current['id']} in progress ({current.get('mode')}) to "
            f"{current.get('release')}"
        )
        canary = current.get("canary")
        if isinstance(canary, dict) and canary.get("holding"):
            emit(f"  canary worker {canary.get('pid')} serves it, waiting for the judge's verdict")
        elif isinstance(canary, dict) and not canary.get("verdict"):
            emit("  canary: its worker is starting")
    if state.get("pending"):
        emit("one more rollout is queued")
    last = state.get("last_rollout")
    if last:
        line = f"last rollout {last.get('id')}: {last.get('outcome')}"
        if last.get("duration_s") is not None:
            line += f" in {last['duration_s']} s"
        if last.get("reason"):
            line += f": {last['reason']}"
        emit(line)
        verdict = (last.get("canary") or {}).get("verdict") if last.get("canary") else None
        if isinstance(verdict, dict):
            f = verdict.get("figures") or {}
            emit(
                f"  canary verdict {verdict.get('decision')}: canary "
                f"{f.get('candidate_errors')}/{f.get('candidate_calls')} errors, old workers "
                f"{f.get('baseline_errors')}/{f.get('baseline_calls')}"
            )
    else:
        emit("no rollout yet")
    watch = state.get("watch") or {}
    if watch.get("enabled"):
        emit(
            f"watch mode on: {watch.get('rollouts_requested', 0)} rollouts requested by saves, "
            f"{watch.get('changes_ignored', 0)} saves without a change ignored"
        )
    elif watch.get("disabled_reason"):
        emit(f"watch mode off: {watch['disabled_reason']}")
    return out.getvalue()


_LIVE = {
    "starting": "the old workers serve; the new master's workers are booting (each serves once "
    "healthy)",
    "draining": "the new master serves; the old workers are stopping",
    "window": "the new master serves; the old master is idle, ready to switch back",
    "switching_back": "switching back: the old workers are starting again",
    "stopping_new": "the new master is stopping",
    "quitting": "the new master serves; the old master is quitting",
}


def _describe_blue_green(pid: int, state: dict[str, Any], emit: Any) -> None:
    current = state.get("blue_green")
    if current:
        old, new = current.get("old_master_pid"), current.get("new_master_pid")
        phase = current.get("phase")
        line = (
            f"blue-green {current.get('id')} in progress ({phase}): old master {old}, new master "
            f"{new}: {_LIVE.get(str(phase), str(phase))}"
        )
        if current.get("window_ends"):
            line += (
                f"; window ends at {_clock(current['window_ends'])}, then the old master quits "
                f"(switch back before: hotpatch deploy --pid {old} --switch-back)"
            )
        emit(line)
    parent = state.get("parent_master_pid")
    if parent:
        line = (
            f"this is the new master of a blue-green started by master {parent}, which still runs"
        )
        theirs = state.get("parent_blue_green")
        if isinstance(theirs, dict) and theirs.get("new_master_pid") == pid:
            line += f" (phase {theirs.get('phase')}"
            if theirs.get("window_ends"):
                line += f", window ends at {_clock(theirs['window_ends'])}"
            line += ")"
        emit(line)
    last = state.get("last_blue_green")
    if last:
        line = (
            f"last blue-green {last.get('id')}: {last.get('outcome')} (new master "
            f"{last.get('new_master_pid')})"
        )
        if last.get("reason"):
            line += f": {last['reason']}"
        emit(line)
    origin = state.get("blue_green_origin")
    if origin:
        emit(
            f"live since blue-green {origin.get('id')} from master {origin.get('old_master_pid')}, "
            f"which quit after its window (at {_clock(origin.get('adopted'))})"
        )


def _clock(epoch: Any) -> str:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return "unknown"
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def _describe_worker(answer: dict[str, Any]) -> str:
    if "unreachable" in answer:
        return f"(not reachable: {answer['unreachable']})"
    if answer.get("outcome") != "status":
        return f"(status refused: {answer.get('message')})"
    patched = answer.get("patched") or {}
    text = f"runs {answer.get('release')}"
    if patched:
        text += "; patched: " + ", ".join(f"{m} {v}" for m, v in sorted(patched.items())[:5])
    current = answer.get("deploy")
    if current:
        text += f"; in deploy {current.get('id')} ({current.get('phase')})"
    for trial in (answer.get("trials") or [])[:3]:  # parallel runs (hotpatch.canary...)
        if isinstance(trial, dict):
            text += (
                f"; {trial.get('kind')} {trial.get('id')} of "
                f"{', '.join(map(str, trial.get('modules') or []))}: {trial.get('phase')} "
                f"at {trial.get('share')}%"
            )
    return text
