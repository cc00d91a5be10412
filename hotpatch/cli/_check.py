"""``hotpatch check [--base REF] [PATH ...]``: can this change ship as a hot patch? (for CI)

Without a running process: every Python module changed between ``REF`` (default ``HEAD``) and the
work tree is imported at its base version in a subprocess and guarded by the engine at its new
one (``hotpatch.check``). Human output by default, ``--json`` for machines.

Exit codes:

- 0: every changed module is hot-patchable (or new), or nothing changed;
- 1: some module needs a rolling reload, is refused, or its verdict is unknown;
- 2: usage or environment error (not a git work tree, unknown ref, a PATH that names nothing,
  git missing).
"""

from __future__ import annotations

import argparse
import json
import sys

from hotpatch.check import DEFAULT_TIMEOUT_S, CheckError, CheckReport, ModuleVerdict, check
from hotpatch.cli import _args

NAME = "check"
HELP = (
    "for CI: is every Python module changed since a git ref hot-patchable? (imports the base "
    "version in a subprocess, runs the engine's guard on the new one): exit 0 yes or nothing "
    "changed, 1 a module needs a rolling reload, is refused or unknown, 2 usage or environment error"
)
EXIT_ERROR = 2
RENDERS = ("check.started", "check.completed")  # the report says it

_LABELS = {
    "hot-patchable": "hot-patchable",
    "needs-reload": "needs reload",
    "refused": "refused",
    "unknown": "unknown",
    "new": "new module",
}
_SUMMARY = {
    "unchanged": "nothing to check: no Python module changed",
    "hot-patchable": "hot-patchable in place",
    "needs-reload": "needs a rolling reload",
    "refused": "refused: the new code does not load",
    "unknown": "unknown: not every module could be decided",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="check only the changes under these files or directories (default: the whole tree)",
    )
    parser.add_argument(
        "--base",
        default="HEAD",
        metavar="REF",
        help="the git ref that running servers have (default: HEAD); e.g. origin/main in CI",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--timeout",
        type=_args.seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline for importing the base and guarding (default: "
        f"{DEFAULT_TIMEOUT_S:g}); what it leaves undecided is reported as unknown",
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = check(base=args.base, paths=args.paths, timeout_s=args.timeout)
    except CheckError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "exit_code": EXIT_ERROR}))
        print(f"hotpatch check: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=True))
    else:
        print(render(report))
    return report.exit_code


def shown(text: str) -> str:
    """One printable line: undecodable bytes, control characters and newlines escaped."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


def render(report: CheckReport) -> str:
    """The report for a person: one line per module, the files not checked, the verdict."""
    lines = [f"hotpatch check: changes since {shown(report.base)} ({report.commit[:12]})"]
    for m in report.modules:
        lines.append(f"  {_LABELS[m.verdict]:<14} {_describe(m)}")
    for s in report.skipped:
        lines.append(f"  {'not checked':<14} {shown(s.path)}: {shown(s.reason)}")
    lines.append(f"verdict: {_SUMMARY[report.verdict]} (exit {report.exit_code})")
    return "\n".join(lines)


def _describe(m: ModuleVerdict) -> str:
    text = f"{shown(m.path)} ({m.module})"
    if m.renamed_from:
        text += f", renamed from {shown(m.renamed_from)}"
    if m.verdict == "hot-patchable":
        detail = m.reason
        if m.added:
            detail += f"; added {', '.join(m.added)}"
        if m.removed:
            detail += f"; removed {', '.join(m.removed)}"
        return f"{text}: {shown(detail)}"
    if m.verdict == "new":
        return text
    where = ""
    if m.filename:
        where = f" [{shown(m.filename)}{f':{m.lineno}' if m.lineno else ''}]"
    return f"{text}: {m.stage}: {shown(m.reason)}{where}"
