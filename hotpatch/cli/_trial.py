"""``hotpatch trial --pid PID {promote,abort} MODULE``: end a parallel run in a running process.

A process that called ``hotpatch.listen`` and runs a ``hotpatch.canary``, ``shadow`` or
``experiment`` shows it in its status answer (``hotpatch status`` lists it under its worker);
this command commits the candidate now (``promote``) or rolls it back now (``abort``). Exit
codes: 0 promoted (or aborted, as asked), 1 the promote ended in a rollback (the old code runs),
2 error (no such run, no such process), 3 outcome unknown (no answer in time).
"""

from __future__ import annotations

import argparse
import sys

from hotpatch.cli._patch import EXIT_DONE, EXIT_ERROR, EXIT_REFUSED, add_process_arguments, ask

NAME = "trial"
HELP = (
    "promote or abort a parallel run (hotpatch.canary/shadow/experiment) in a running process: "
    "exit 0 done, 1 the promote was rolled back, 2 error, 3 outcome unknown"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_process_arguments(parser)
    parser.add_argument("action", choices=("promote", "abort"), help="commit now, or roll back now")
    parser.add_argument("module", help="a module under trial, e.g. myapp.pricing")


def run(args: argparse.Namespace) -> int:
    answer = ask(NAME, args.pid, args.action, module=args.module, timeout_s=args.timeout)
    if isinstance(answer, int):
        return answer
    trial = answer.get("trial")
    if not isinstance(trial, dict):
        print(f"error: {answer.get('message')}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"process {answer.get('pid')}: {trial.get('kind')} {trial.get('id')} of "
        f"{', '.join(map(str, trial.get('modules') or []))}: {trial.get('outcome')} "
        f"({trial.get('reason')}); the new version served {trial.get('new_calls')} calls, "
        f"{trial.get('new_errors')} errors"
    )
    if trial.get("outcome") == "rolled_back" and args.action == "promote":
        print(f"  {trial.get('detail')}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_DONE
