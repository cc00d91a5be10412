"""Turn a worker's exception into a one-line reason (file:line, stage) and its traceback text.

Tracebacks from a worker name files in the release snapshot; both are rewritten to name the
app directory, which is where the user edits them.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path


def describe_exception(
    exc: BaseException,
    *,
    stage: str,
    release_dir: Path,
    app_dir: Path,
    app_module: str | None = None,
) -> tuple[str, str]:
    """Returns ``(reason, error_text)`` for ``exc`` raised at ``stage`` in a worker.

    The reason reads ``<file>:<line>: <ExceptionType>: <message> (stage: <stage>)``; the file is
    the innermost frame inside the app (for a ``SyntaxError``, the file and line it points at;
    with no app frame, the app module's file).
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = text.replace(str(release_dir), str(app_dir))
    where = _where(exc, release_dir, app_module)
    where = where.replace(str(release_dir), str(app_dir)) if where else ""
    message = str(exc).replace(str(release_dir), str(app_dir))
    if isinstance(exc, SyntaxError):
        message = exc.msg
    label = type(exc).__name__
    head = f"{where}: " if where else ""
    return f"{head}{label}: {message} (stage: {stage})", text


def _where(exc: BaseException, release_dir: Path, app_module: str | None) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}" if exc.lineno else exc.filename
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f.filename.startswith(str(release_dir))]
    if inside:
        return f"{inside[-1].filename}:{inside[-1].lineno}"
    if app_module:
        module = sys.modules.get(app_module)
        filename = getattr(module, "__file__", None)
        if filename:
            return str(filename)
        guess = release_dir / (app_module.replace(".", "/") + ".py")
        if guess.exists():
            return str(guess)
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return ""
