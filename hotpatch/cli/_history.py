"""``hotpatch history --pid PID [MODULE]``: the versions of the modules a process listens to."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hotpatch.cli._patch import EXIT_DONE, add_process_arguments, ask, report

NAME = "history"
HELP = (
    "the versions of each module a running process (one that called hotpatch.listen) has had, "
    "newest first; the ids work with `hotpatch rollback --to`"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_process_arguments(parser)
    parser.add_argument("module", nargs="?", help="only this module (default: every one)")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def run(args: argparse.Namespace) -> int:
    answer = ask(NAME, args.pid, "history", module=args.module, timeout_s=args.timeout)
    if isinstance(answer, int):
        return answer
    if answer.get("outcome") != "history":
        return report(answer)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_DONE
    modules: dict[str, list[dict[str, Any]]] = answer.get("modules") or {}
    if not modules:
        print(f"process {answer.get('pid')}: no listened module is imported yet")
    for name, versions in modules.items():
        print(f"{name}:")
        if not versions:
            print("  (never patched: no history yet)")
        for version in versions:
            print("  " + _line(version))
    return EXIT_DONE


def _line(version: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(version.get("time") or 0)))
    text = f"{version.get('id', '?'):<12}  {version.get('outcome', '?'):<11}  {when}"
    if version.get("is_live"):
        text += "  live"
    if version.get("stage"):
        text += f"  at {version['stage']}"
    if version.get("reason"):
        text += f": {version['reason']}"
    return text
