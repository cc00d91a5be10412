"""The in-process engine: source -> candidate -> guard -> commit at a safe point -> health -> history.

Owns everything that changes code inside this process, one stage per module:

- ``candidate``: read and decode the source, compile it, execute it into a fresh module object;
- ``statements``: the per-statement index that says which top-level values a version changed,
  derived from the previous version's by re-reading what an edit touched (``alignment``: where
  two texts differ; ``tables``: data-table rows left out of that re-read);
- ``guard``: API compatibility (signatures, classes) and the deadline runner for user checks;
- ``swap`` (pairing and planning), ``compare`` (what counts as changed), ``rebind`` (the
  candidate's objects re-pointed at the live ones): the plan of the commit;
- ``derived``: which statements compute values from names a change set changed (re-derive them,
  or refuse with "needs a restart");
- ``fidelity``: which live modules depend on a change, stale references, the post-commit check;
- ``changeset``: the commit's assignments and their exact inverse;
- ``safepoint``: the moment no thread is inside replaced code, and the gates that make it come;
- ``history``: every version of every module, for rollback;
- ``modulemap``: which file is which module, and the order modules depend on each other;
- ``pipeline``: ``Engine``, which runs the stages in order, and the module-level API.

May import: ``hotpatch.errors``, ``hotpatch._log`` and the standard library. Never imports watch,
control, gunicorn, cli or demo: everything else is built on this package.
"""

from hotpatch.engine.history import Version
from hotpatch.engine.pipeline import (
    Engine,
    HealthCheck,
    PatchResult,
    SourceInput,
    Verifier,
    default_engine,
    health_check,
    history,
    patch,
    patch_many,
    rollback,
    track,
    verifier,
)

__all__ = [
    "Engine",
    "HealthCheck",
    "PatchResult",
    "SourceInput",
    "Verifier",
    "Version",
    "default_engine",
    "health_check",
    "history",
    "patch",
    "patch_many",
    "rollback",
    "track",
    "verifier",
]
