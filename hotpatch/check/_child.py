"""The subprocess of ``hotpatch check``: import the base, wait for the overlay, patch, report.

Runs project code; everything it says goes to the parent on a pipe of its own, one JSON event a
line, so what the project prints on its standard output cannot fake a verdict.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from hotpatch.check._report import MAX_FILE_BYTES, MAX_REASON_CHARS

ORPHAN_POLL_S = 0.2
"""How often the subprocess looks whether its parent, ``hotpatch check``, is still there."""


# -- the subprocess -------------------------------------------------------------------------------
def main() -> None:  # pragma: no cover - runs in the check subprocess
    """Import the base versions, wait for the overlay, run the engine's patch, report each step."""
    events_fd, control_fd = int(sys.argv[1]), int(sys.argv[2])
    control = os.fdopen(control_fd, "rb")

    def emit(**event: object) -> None:
        os.write(events_fd, json.dumps(event, default=str).encode("ascii") + b"\n")

    from hotpatch.engine import default_engine
    from hotpatch.errors import PatchRejected

    job = json.loads(control.readline())
    import threading
    import time

    parent = int(job["parent_pid"])

    def end_when_orphaned() -> None:  # the parent killed while project code hangs here
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(125)

    threading.Thread(target=end_when_orphaned, name="hotpatch-check-orphan", daemon=True).start()
    ender = threading.Timer(float(job["exit_after_s"]), os._exit, args=(124,))  # a last resort
    ender.daemon = True
    ender.start()
    sys.path[:0] = job["roots"]
    sys.dont_write_bytecode = True
    tree = os.path.realpath(job["tree"]) + os.sep
    engine = default_engine()  # the one the project's own verifiers and health checks join
    imported: list[str] = []
    for name in job["guard"]:
        emit(event="importing", module=name)
        try:
            module = __import__("importlib").import_module(name)
            filename = getattr(module, "__file__", None) or ""
            if not os.path.realpath(filename).startswith(tree):
                raise ImportError(f"{name} was imported from {filename or '?'}, not from the tree")
            engine.track(name)
        except BaseException as exc:
            emit(event="base_failed", module=name, **_describe(exc, tree))
            continue
        imported.append(name)
    emit(event="based")
    if control.readline() != b"go\n":
        os._exit(3)
    __import__("importlib").invalidate_caches()
    remaining = list(imported)
    while (
        remaining
    ):  # the change set, then what refusals leave of it (with nothing that needs them)
        emit(event="guarding", modules=remaining)
        try:
            results = engine.patch_many(remaining)
        except PatchRejected as exc:
            emit(event="rejected", **exc.details())
            if exc.module not in remaining:
                break
            needing = _needing(exc.module, remaining)
            if needing:
                emit(event="blocked", modules=needing, by=exc.module)
            remaining = [m for m in remaining if m != exc.module and m not in needing]
        except BaseException as exc:
            emit(event="guard_error", error=_describe(exc, tree)["error"])
            break
        else:
            fields = ("module", "changed", "added", "removed", "derived")
            emit(event="guarded", results=[{f: getattr(r, f) for f in fields} for r in results])
            break
    for name in job["new"]:
        emit(event="importing_new", module=name)
        try:
            __import__("importlib").import_module(name)
        except BaseException as exc:
            emit(event="new_failed", module=name, **_describe(exc, tree))
        else:
            emit(event="new_imported", module=name)
    emit(event="done")
    os._exit(0)  # project code's threads and atexit handlers are not ours to wait for


def _needing(blocker: str, names: Sequence[str]) -> list[str]:  # pragma: no cover
    """The modules of ``names`` that import ``blocker``, directly or through each other."""
    from hotpatch.engine.modulemap import imported_modules, package_of

    imports: dict[str, set[str]] = {}
    for name in names:
        filename = getattr(sys.modules.get(name), "__file__", None)
        try:
            with open(str(filename), "rb") as fh:
                text = fh.read(MAX_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            text = ""
        imports[name] = imported_modules(text, package=package_of(name))
    found: set[str] = set()
    frontier = {blocker}
    while frontier:
        frontier = {n for n in names if n not in found and n != blocker and imports[n] & frontier}
        found |= frontier
    return sorted(found)


def _describe(exc: BaseException, tree: str) -> dict[str, object]:  # pragma: no cover
    """An exception as a report (in the subprocess): type, message, the innermost tree file:line."""
    filename, lineno = None, None
    if isinstance(exc, SyntaxError) and exc.filename:
        filename, lineno = exc.filename, exc.lineno
    else:
        tb = exc.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if os.path.realpath(name).startswith(tree):
                filename, lineno = name, tb.tb_lineno
            tb = tb.tb_next
    message = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
    return {
        "error": message,
        "filename": filename,
        "lineno": lineno,
        "syntax": isinstance(exc, SyntaxError),
    }
