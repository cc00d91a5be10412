"""``hotpatch deploy``: ship the code on disk to every worker of a gunicorn master.

Exit codes (also in ``--help`` and docs/deploy.md): 0 deployed (or nothing to deploy, or with
``--no-wait`` a rolling reload started); 1 refused or rolled back, nothing of the new code is
live; 2 usage or environment error, nothing was tried; 3 the outcome is unknown: the command
stopped waiting (``--timeout``) and the deploy may still be running.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from hotpatch.cli import _args
from hotpatch.cli._rollout import add_master_arguments, describe_event, master_pid
from hotpatch.errors import HotpatchError
from hotpatch.gunicorn._bluegreen import switch_back
from hotpatch.gunicorn._client import load_state
from hotpatch.gunicorn._coordinator import DeployResult, deploy
from hotpatch.gunicorn._deploy import STRATEGIES

NAME = "deploy"
EXIT_DEPLOYED = 0
EXIT_REFUSED = 1
EXIT_ERROR = 2
EXIT_UNKNOWN = 3
HELP = (
    "deploy the code in a gunicorn master's app directory to all its workers: in place (every "
    "worker patches itself, all or nothing, no restart), rolling, blue-green (a second master, "
    "then a switch-back window), or auto (in place when every worker accepts the change, else "
    "rolling); exit 0: deployed (or switched back), 1: refused or rolled back, 2: "
    "usage or environment error, 3: outcome unknown, still running after --timeout"
)
_EXIT = {
    "deployed": EXIT_DEPLOYED,
    "unchanged": EXIT_DEPLOYED,
    "started": EXIT_DEPLOYED,
    "switched_back": EXIT_DEPLOYED,
    "refused": EXIT_REFUSED,
    "rolled_back": EXIT_REFUSED,
    "rollback_failed": EXIT_REFUSED,
    "unknown": EXIT_UNKNOWN,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_master_arguments(parser)
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="in-place: every worker patches its modules, all or nothing; rolling: replace the "
        "workers one at a time; blue-green: a second master (gunicorn's USR2 re-exec) with a "
        "full set of new workers, then the old workers stop and the old master waits --keep-old "
        "seconds; auto (default): in-place when phase 1 accepts in every worker, otherwise "
        "rolling",
    )
    parser.add_argument(
        "--keep-old",
        type=_args.seconds,
        default=60.0,
        metavar="SECONDS",
        help="blue-green: how long the old master stays idle after the switch, ready to switch "
        "back (default: 60); it then quits",
    )
    parser.add_argument(
        "--switch-back",
        action="store_true",
        help="blue-green: bring the old workers back and stop the new master; give the OLD "
        "master's pid (the one deployed to; gunicorn's pidfile still names it during the window)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.seconds,
        default=120.0,
        metavar="SECONDS",
        help="stop waiting after this long: the exit code is then 3, outcome unknown (default: "
        "120)",
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the outcome (default); --no-wait returns once a rolling reload or a "
        "blue-green has started (the master runs it; an in-place deploy is always waited for: "
        "this command coordinates it)",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")


def describe(event: dict[str, Any]) -> str:
    """One progress line for a deploy event."""
    t = f"{float(event.get('t', 0.0)):8.3f}s"
    kind = event.get("event")
    if kind == "deploy.started":
        changed = event.get("changed") or []
        shown = ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else "")
        text = (
            f"deploy {event.get('deploy_id')} of {event.get('release')} started (known-good "
            f"{event.get('known_good')}, {len(event.get('workers') or [])} workers; changed: "
            f"{shown or 'nothing'})"
        )
    elif kind == "worker.phase":
        outcome = event.get("outcome")
        text = f"worker {event.get('worker_pid')}  {event.get('phase'):<8} {outcome}"
        if event.get("modules"):
            text += f" ({', '.join(event['modules'][:5])})"
        if event.get("message") and outcome not in ("accepted", "committed", "healthy"):
            text += f": {event['message']}"
    elif kind == "deploy.refused":
        text = f"in-place REFUSED at {event.get('phase')}: {event.get('reason')}"
    elif kind == "deploy.failed":
        text = f"in-place FAILED: {event.get('reason')}; rolling every worker back"
    elif kind == "deploy.fallback":
        text = "auto: in-place is not possible, deploying with a rolling reload instead"
    elif kind == "rolling.started":
        text = f"rolling reload (rollout {event.get('rollout_id')}) requested"
    elif kind == "rolling.event":
        return f"{t}  {describe_event(event.get('rollout') or {}).lstrip()}"
    elif kind == "deploy.completed":
        text = f"every worker confirmed {event.get('release')}"
    elif kind == "deploy.unchanged":
        text = "nothing changed: the app directory holds the code already running"
    elif isinstance(kind, str) and kind.startswith("bluegreen."):
        text = _describe_blue_green(kind, event)
    else:
        text = str(kind)
    return f"{t}  {text}"


def _describe_blue_green(kind: str, event: dict[str, Any]) -> str:
    new = event.get("new_master_pid")
    texts = {
        "bluegreen.started": f"blue-green: new master started, pid {new}",
        "bluegreen.workers_ready": f"new master: {event.get('ready')}/{event.get('size')} "
        "workers healthy",
        "bluegreen.healthy": f"new master: {event.get('ready')}/{event.get('size')} workers "
        "healthy: switching",
        "bluegreen.old_workers_stopping": "stopping the old workers gracefully ("
        + ", ".join(map(str, event.get("workers") or []))
        + ")",
        "bluegreen.old_workers_stopped": "old workers stopped; the old master is idle",
        "bluegreen.window_opened": "switch-back window open until "
        f"{_clock(event.get('window_ends'))}",
        "bluegreen.failed": f"the new set FAILED: {event.get('reason')}",
        "bluegreen.aborted": f"switch-back requested ({event.get('by')}) before the switch",
        "bluegreen.switching_back": f"switching back to {event.get('release')}: "
        f"{event.get('reason')}",
        "bluegreen.old_workers_back": f"old workers back: {event.get('ready')}/{event.get('size')} "
        "healthy",
        "bluegreen.new_master_stopping": f"stopping the new master {new} (TERM)",
        "bluegreen.new_master_stopped": f"new master {new} exited",
        "bluegreen.orphans_stopped": "stopping the dead new master's workers ("
        + ", ".join(map(str, event.get("workers") or []))
        + ")",
        "bluegreen.new_master_killed": f"new master {new} did not exit in time: KILL",
        "bluegreen.old_master_quitting": "window over, the new set is healthy: the old master "
        "quits (QUIT)",
        "bluegreen.old_master_quit": f"old master {event.get('old_master_pid')} quit; master "
        f"{new} serves alone",
        "bluegreen.redirected": f"master {new} is the new master of a blue-green: switching "
        f"back through its old master {event.get('old_master_pid')}",
        "bluegreen.refused": f"blue-green REFUSED: {event.get('reason')}",
    }
    if kind in texts:
        return texts[kind]
    outcome = kind.split(".", 1)[1]
    return f"blue-green {outcome}" + (f": {event['reason']}" if event.get("reason") else "")


def _clock(epoch: Any) -> str:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return "unknown"
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def verdict(result: DeployResult) -> str:
    """The final line."""
    if result.strategy == "blue-green":
        return _blue_green_verdict(result)
    if result.outcome == "deployed" and result.strategy == "in-place":
        line = (
            f"OK: deployed in place: release {result.release} is live in every worker, no worker "
            f"restarted; {result.to_last_commit_s:.3f} s from the start to the last commit"
        )
    elif result.outcome == "deployed":
        line = f"OK: deployed by a rolling reload: release {result.release} is live"
    elif result.outcome == "unchanged":
        line = "OK: nothing to deploy: the app directory holds the code already running"
    elif result.outcome == "started":
        line = f"STARTED: rolling reload {result.rollout_id} runs in the master (not waited for)"
    elif result.outcome == "refused":
        line = f"REFUSED ({result.strategy}): nothing changed anywhere"
    elif result.outcome == "rolled_back":
        line = f"ROLLED BACK ({result.strategy}): every worker runs the previous version"
    elif result.outcome == "rollback_failed":
        line = f"FAILED ({result.strategy}): the rollback did not complete"
    else:
        line = "UNKNOWN: the deploy may still be running"
    if result.reason:
        is_fallback = result.strategy == "rolling" and result.outcome in ("deployed", "started")
        line += f"; {'why rolling: ' if is_fallback else ''}{result.reason}"
    return line


def _blue_green_verdict(result: DeployResult) -> str:
    info = result.blue_green or {}
    old, new = info.get("old_master_pid"), info.get("new_master_pid")
    if result.outcome == "deployed":
        line = f"OK: blue-green: master {new} serves the new code; the old master {old} quit"
    elif result.outcome == "started":
        line = (
            f"STARTED: blue-green: new master {new}; the old master {old} runs the switch and the "
            "window (not waited for; `hotpatch status` shows it)"
        )
    elif result.outcome == "switched_back":
        line = f"OK: switched back: the old master {old} serves the old code again"
    elif result.outcome == "refused" and not new:
        line = "REFUSED (blue-green): nothing changed"
    elif result.outcome == "refused":
        line = (
            f"REFUSED (blue-green): the old workers kept serving; the new master {new} was stopped"
        )
    elif result.outcome == "rolled_back":
        line = f"SWITCHED BACK (blue-green): the old master {old} serves the old code again"
        if new:
            line += f", the new master {new} was stopped"
    elif result.outcome == "rollback_failed":
        line = "FAILED (blue-green): the switch-back did not complete"
    else:
        line = "UNKNOWN: the blue-green may still be running"
    if result.reason:
        line += f"; {result.reason}"
    return line


def run(args: argparse.Namespace) -> int:
    try:
        pid = master_pid(args)
        load_state(pid, args.state_dir)  # a usage error before any output of the deploy
    except HotpatchError as exc:
        print(f"hotpatch deploy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    lock = threading.Lock()  # events come from one thread per worker

    def show(event: dict[str, Any]) -> None:
        with lock:
            print(describe(event), flush=True)

    if not args.json:
        if args.switch_back:
            print(f"switch back the blue-green of gunicorn master {pid}", flush=True)
        else:
            print(f"deploy to gunicorn master {pid} (strategy {args.strategy})", flush=True)
    try:
        if args.switch_back:
            result = switch_back(
                pid,
                timeout_s=args.timeout,
                state_dir=args.state_dir,
                on_event=None if args.json else show,
            )
        else:
            result = deploy(
                pid,
                strategy=args.strategy,
                timeout_s=args.timeout,
                wait=args.wait,
                state_dir=args.state_dir,
                on_event=None if args.json else show,
                keep_old_s=args.keep_old,
            )
    except HotpatchError as exc:
        if args.json:
            print(json.dumps({"outcome": "error", "reason": str(exc)}))
        else:
            print(f"hotpatch deploy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    code = _EXIT.get(result.outcome, EXIT_UNKNOWN)
    if args.json:
        print(json.dumps({**result.as_dict(), "exit_code": code}, default=str))
    else:
        print(verdict(result), file=sys.stdout if code == 0 else sys.stderr)
    return code
