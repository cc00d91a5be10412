"""``hotpatch check``: is a git diff hot-patchable? Decided without a server, by the engine itself.

A CI job wants to know, for a pull request, whether its change can ship as an in-place hot patch or
needs a rolling reload, before any server sees it. The only trustworthy answer is the engine's own:
a second rule set written for CI would drift from what ``Engine.patch_many`` accepts, and the
verdict would be a guess. And the engine judges a new version against a *live* module, so the old
version must really run somewhere: there is no process running the base, and the checker's own
process must not import project code (it may hang, exit, or never import at all).

So the base version is materialized into a private temporary directory (``git read-tree`` into a
temporary index, then ``git checkout-index --prefix``: the repository's index and work tree are
never touched), and a subprocess started for the purpose imports the changed modules from there
(with a deadline over the whole run), records them as the engine's baselines (``Engine.track``),
and reports each step on a pipe of its own (project code may print anything on its standard
output). Then the temporary tree is brought to the work tree's content, file by file, as a deploy
writes new files under a running server, and the subprocess runs ``Engine.patch_many`` on the
changed modules, exactly what ``hotpatch patch`` runs in a live process: dependency order, one
change set, all or nothing, post-commit checks included (committing is harmless there: the process
is thrown away). Each module gets a verdict: ``hot-patchable``, ``needs-reload`` (the engine refused
at ``compatibility`` or ``safepoint``: a removed public name, a changed class layout, derived state
it cannot redo), ``refused`` (the new code itself fails: ``load``, ``compile``, ``execute``,
``verify``, ``health``) or ``unknown`` (the base does not import, the deadline passed, the
subprocess died, or the module imports one that was refused). All or nothing means one refusal
names one module: so the refused module is set aside with the modules that import it (directly or
through the change; they cannot be guarded without it: ``unknown``), and the rest is guarded again,
until a set is accepted or nothing is left; a verdict reached that way says what was set aside.
New modules are imported after the patch (``new`` when they import, else ``refused``); a deleted
module ``needs-reload`` (a running process keeps it loaded; only a restart drops it).

Importing runs project code: ``hotpatch check`` gives the repository the same trust as running
its test suite. Nothing else from outside is trusted: the ref is resolved with ``git rev-parse
--verify --end-of-options`` (a ref spelled like an option stays a ref), path arguments are literal
pathspecs, file names stay bytes until decoded with ``os.fsdecode``, work-tree files are read and
the temporary tree written one directory at a time through file descriptors with ``O_NOFOLLOW``
(no link is followed), and only the process group this module started is ever signalled.

Owns ``hotpatch check``'s logic (the command's output is ``cli/_check.py``): ``_git`` (the base
commit and what changed), ``_files`` (file -> module; reading and writing trees without
following links), ``_run`` (the parent: plan, subprocess, verdicts), ``_child`` (the subprocess),
``_report`` (the report's types). May import: ``hotpatch.engine``, ``hotpatch.errors``.
"""

from hotpatch.check._report import (
    DEFAULT_TIMEOUT_S,
    CheckError,
    CheckReport,
    ModuleVerdict,
    Skipped,
)
from hotpatch.check._run import check

__all__ = ["DEFAULT_TIMEOUT_S", "CheckError", "CheckReport", "ModuleVerdict", "Skipped", "check"]
