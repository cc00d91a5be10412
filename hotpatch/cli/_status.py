"""``hotpatch status``: a gunicorn master's workers, their releases, and the last rollout."""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from hotpatch.cli._rollout import add_master_arguments, master_pid
from hotpatch.errors import HotpatchError
from hotpatch.gunicorn._client import load_state

NAME = "status"
HELP = "show a gunicorn master's workers, the release each runs, and the last rollout's outcome"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_master_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw state as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        pid = master_pid(args)
        state = load_state(pid, args.state_dir)
    except HotpatchError as exc:
        print(f"hotpatch status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    try:
        text = describe_state(pid, state)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        print(
            f"hotpatch status: master {pid}: its state is malformed ({type(exc).__name__}: "
            f"{exc}); `--json` shows it as it is",
            file=sys.stderr,
        )
        return 2
    print(text, end="")
    return 0


def describe_state(pid: int, state: dict[str, Any]) -> str:
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
            print(
                f"known-good release {release} is DAMAGED: new workers cannot start until a "
                f"rollout succeeds ({reason})"
            )
        else:
            print(f"release {release} is damaged: {reason}")
    if not state.get("rolling"):
        emit(f"rolling reload DISABLED: {state.get('disabled_reason')}")
    for worker in state.get("workers", []):
        emit(f"  worker {int(worker['pid']):>7}  {worker.get('release')}  {worker.get('phase')}")
    current = state.get("rollout")
    if current:
        emit(
            f"rollout {current['id']} in progress ({current.get('mode')}) to "
            f"{current.get('release')}"
        )
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
