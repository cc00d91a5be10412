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
from hotpatch.gunicorn._canary import (
    DEFAULT_BAKE_S,
    DEFAULT_MIN_LATENCY_SHIFT_S,
    DEFAULT_MIN_SAMPLES,
    CanaryOptions,
)
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
    "worker patches itself, all or nothing, no restart), rolling, canary (one new worker judged "
    "on real traffic first), blue-green (a second master, then a switch-back window), or auto "
    "(in place when every worker accepts the change, else rolling); exit 0: deployed (or "
    "switched back), 1: refused or rolled back, 2: "
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
        "workers one at a time; canary: one new worker serves beside the old ones for --bake "
        "seconds and is judged against them, then the rest roll (or it is rolled back); "
        "blue-green: a second master (gunicorn's USR2 re-exec) with a full set of new workers, "
        "then the old workers stop and the old master waits --keep-old seconds; auto "
        "(default): in-place when phase 1 accepts in every worker, otherwise rolling",
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
        "--bake",
        type=_args.seconds,
        default=None,
        metavar="SECONDS",
        help=f"canary: how long the canary serves before it is judged (default: "
        f"{DEFAULT_BAKE_S:g})",
    )
    parser.add_argument(
        "--min-samples",
        type=_args.positive_int,
        default=None,
        metavar="N",
        help=f"canary: requests the canary and the old workers each need before a verdict "
        f"(default: {DEFAULT_MIN_SAMPLES})",
    )
    parser.add_argument(
        "--bake-deadline",
        type=_args.seconds,
        default=None,
        metavar="SECONDS",
        help="canary: too few requests to judge extends the bake up to this long, then the "
        "canary is rolled back (default: twice --bake)",
    )
    parser.add_argument(
        "--min-latency-shift",
        type=_args.seconds,
        default=None,
        metavar="SECONDS",
        help=f"canary: the smallest rise of the median latency that can fail the canary, on "
        f"top of the 25%% bound (default: {DEFAULT_MIN_LATENCY_SHIFT_S:g}; raise it on a host "
        f"whose CPU is saturated, where scheduling alone moves medians by milliseconds)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.seconds,
        default=None,
        metavar="SECONDS",
        help="stop waiting after this long: the exit code is then 3, outcome unknown (default: "
        "120; canary: the bake deadline plus 120)",
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the outcome (default); --no-wait returns once a rolling reload or a "
        "blue-green has started (the master runs it; an in-place or canary deploy is always "
        "waited for: this command coordinates it)",
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
    elif kind == "canary.started":
        text = (
            f"canary rollout {event.get('rollout_id')} of {event.get('release')} started: one new "
            "worker first"
        )
    elif kind == "canary.serving":
        text = (
            f"canary worker {event.get('worker_pid')} serves {event.get('release')} beside "
            f"{len(event.get('old_workers') or [])} old workers; baking"
        )
    elif kind == "canary.progress":
        text = (
            f"canary {event.get('canary_requests')} requests, {event.get('canary_errors')} "
            f"errors; old workers {event.get('baseline_requests')} requests, "
            f"{event.get('baseline_errors')} errors"
        )
    elif kind == "canary.judged":
        text = f"canary judged: {str(event.get('decision')).upper()}"
        if event.get("reason"):
            text += f": {event['reason']}"
        else:
            text += f" ({(event.get('figures') or {}).get('detail')})"
    elif kind == "canary.replaced":
        text = (
            f"canary worker {event.get('previous_pid')} was replaced by {event.get('worker_pid')}"
            " (recycled): the bake starts over"
        )
    elif kind == "canary.verdict_refused":
        text = f"the master refused the verdict: {event.get('reason')}"
    elif kind == "rolling.completed":
        text = "every worker rolled to the new release"
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
    elif result.outcome == "deployed" and result.strategy == "canary":
        line = (
            f"OK: the canary passed and release {result.release} rolled to every worker"
            f"{_canary_figures(result)}"
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
    if result.strategy == "canary" and result.outcome == "rolled_back":
        line = (
            "ROLLED BACK (canary): the canary was retired, the old workers kept serving"
            f"{_canary_figures(result)}"
        )
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


def _canary_figures(result: DeployResult) -> str:
    f = result.canary or {}
    if not f:
        return ""
    shift = f.get("median_shift")
    return (
        f" (canary {f.get('candidate_errors')}/{f.get('candidate_calls')} errors, old workers "
        f"{f.get('baseline_errors')}/{f.get('baseline_calls')}; error p="
        f"{_g(f.get('error_p_value'))}, latency p={_g(f.get('latency_p_value'))}, median shift "
        f"{'n/a' if shift is None else f'{shift:+.1%}'})"
    )


def _g(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "n/a"


def _canary_options(args: argparse.Namespace) -> CanaryOptions | None:
    given = (args.bake, args.min_samples, args.bake_deadline, args.min_latency_shift)
    if args.strategy != "canary":
        if any(v is not None for v in given):
            raise HotpatchError(
                "--bake, --min-samples, --bake-deadline and --min-latency-shift need "
                "--strategy canary"
            )
        return None
    return CanaryOptions(
        bake_s=DEFAULT_BAKE_S if args.bake is None else args.bake,
        min_samples=DEFAULT_MIN_SAMPLES if args.min_samples is None else args.min_samples,
        deadline_s=args.bake_deadline,
        min_latency_shift_s=(
            DEFAULT_MIN_LATENCY_SHIFT_S
            if args.min_latency_shift is None
            else args.min_latency_shift
        ),
    )


def run(args: argparse.Namespace) -> int:
    try:
        pid = master_pid(args)
        canary = _canary_options(args)
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
        timeout = args.timeout
        if timeout is None:
            timeout = 120.0 if canary is None else canary.until_s + 120.0
        if args.switch_back:
            result = switch_back(
                pid,
                timeout_s=timeout,
                state_dir=args.state_dir,
                on_event=None if args.json else show,
            )
        else:
            result = deploy(
                pid,
                strategy=args.strategy,
                timeout_s=timeout,
                canary=canary,
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
