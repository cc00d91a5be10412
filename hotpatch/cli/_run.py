"""``hotpatch run``: run a program as ``python`` would, with watch mode on.

``hotpatch run [--watch PATH ...] script.py [args]`` and ``hotpatch run [--watch PATH ...] -m
module [args]`` set ``sys.argv`` and ``sys.path[0]`` as ``python script.py`` and ``python -m
module`` do, run the program as ``__main__`` and return its exit code. Meanwhile every saved
module under the watched paths (default: the script's directory, or the current directory with
``-m``) is patched into the running program; outcomes are printed plainly on standard error
(with ``--log-format json``, as the JSON events of the watcher and the engine instead).
"""

from __future__ import annotations

import argparse
import builtins
import importlib.machinery
import os
import runpy
import sys
import traceback
import types
from collections.abc import Sequence

from hotpatch.cli import _output
from hotpatch.errors import ConfigError
from hotpatch.watch import WatchEvent, watch

NAME = "run"
HELP = "run a Python program with watch mode on: each saved module is patched into it as it runs"
# Events this command prints itself on the console (one line per change); JSON shows the events.
RENDERS = (
    "watch.change_detected",
    "watch.change_applied",
    "watch.change_refused",
    "watch.names_removed",
    "watch.file_deleted",
    "watch.file_ignored",
    "patch.applied",
    "patch.rejected",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch",
        action="append",
        default=[],
        metavar="PATH",
        help="directory or file to watch (repeatable; default: the script's directory, or the "
        "current directory with -m)",
    )
    parser.add_argument(
        "--quiet-period-ms",
        type=float,
        default=20.0,
        metavar="MS",
        help="how long a burst of saves must be quiet before it is applied (default: 20)",
    )
    parser.add_argument(
        "-m",
        dest="module",
        nargs=argparse.REMAINDER,
        metavar="MODULE [ARGS]",
        help="run a library module as a script, as python -m does",
    )
    parser.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="script.py [ARGS]",
        help="the script to run and its arguments",
    )


def run(args: argparse.Namespace) -> int:
    module_argv: list[str] | None = args.module
    if module_argv is not None:
        if not module_argv:
            print("hotpatch run: -m needs a module name", file=sys.stderr)
            return 2
        return run_program(
            module=module_argv[0],
            argv=module_argv[1:],
            watch_paths=args.watch,
            quiet_period_s=args.quiet_period_ms / 1000,
        )
    if not args.argv:
        print("hotpatch run: give a script (script.py [args]) or -m module [args]", file=sys.stderr)
        return 2
    return run_program(
        script=args.argv[0],
        argv=args.argv[1:],
        watch_paths=args.watch,
        quiet_period_s=args.quiet_period_ms / 1000,
    )


def run_program(
    *,
    script: str | None = None,
    module: str | None = None,
    argv: Sequence[str] = (),
    watch_paths: Sequence[str] = (),
    quiet_period_s: float = 0.02,
) -> int:
    """Run ``script`` or ``module`` as ``__main__`` with watch mode on; return its exit code.

    Args:
        script: path of the script to run (exclusive with ``module``).
        module: name of the module to run, as ``python -m`` (exclusive with ``script``).
        argv: the program's arguments, after the script or module.
        watch_paths: what to watch; default: the script's directory (the current directory
            with ``module``).
        quiet_period_s: the watcher's quiet period.

    Returns:
        The program's exit code, as ``python`` would return it.
    """
    if (script is None) == (module is None):
        raise ValueError("give exactly one of script and module")
    if script is not None:
        path = os.path.abspath(script)
        if not os.path.isfile(path):
            print(f"hotpatch run: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        sys.argv[:] = [script, *argv]
        sys.path[0] = os.path.dirname(os.path.realpath(path))
        default_root = os.path.dirname(path)
    else:
        sys.argv[:] = [str(module), *argv]  # runpy sets argv[0] to the module's file, as python
        sys.path[0] = os.getcwd()
        default_root = os.getcwd()
    try:
        watcher = watch(
            list(watch_paths) or [default_root],
            on_event=_print_event,
            quiet_period_s=quiet_period_s,
            max_delay_s=max(0.5, quiet_period_s),
        )
    except ConfigError as exc:
        print(f"hotpatch run: {exc}", file=sys.stderr)
        return 2
    try:
        if script is not None:
            _run_script(path)
        else:
            runpy.run_module(str(module), run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_code(exc)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the program's own uncaught error: report it as python does
        _print_program_error(exc)
        return 1
    finally:
        watcher.stop()
    return 0


def _run_script(path: str) -> None:
    """Run the file ``path`` as ``__main__``, as ``python path`` does.

    ``runpy.run_path`` would also do, but it sets ``sys.argv[0]`` to the path it is given, where
    python leaves the script as typed and makes only ``__file__`` absolute. Directories and zip
    files (which hold a ``__main__.py``) go through ``runpy.run_path``.
    """
    if not path.endswith(".py"):
        runpy.run_path(path, run_name="__main__")
        return
    with open(path, "rb") as file:
        code = compile(file.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__dict__.update(
        __cached__=None,
        __loader__=importlib.machinery.SourceFileLoader("__main__", path),
        __builtins__=builtins,
    )
    previous = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        if previous is not None:
            sys.modules["__main__"] = previous


def _print_event(event: WatchEvent) -> None:
    lines = event.describe().splitlines()
    _output.human("\n".join(f"hotpatch: {line}" for line in lines))


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_program_error(exc: BaseException) -> None:
    """Print the traceback from the program's own frames on, without runpy's and ours."""
    tb = exc.__traceback__
    own = {os.path.normcase(runpy.__file__), os.path.normcase(__file__), "<frozen runpy>"}
    while tb is not None and os.path.normcase(tb.tb_frame.f_code.co_filename) in own:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
