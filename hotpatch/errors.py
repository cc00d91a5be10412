"""One exception hierarchy for hotpatch.

```
HotpatchError
  + PatchRejected            new code was refused or rolled back; .stage says where; live code unchanged
  + RolloutFailed            a gunicorn rollout stopped; .rolled_back says whether known-good is back
    - HealthCheckTimeout       (also a TimeoutError)
  + ConfigError              (also a ValueError)
  + InsecurePath             (also a PermissionError) a path hotpatch would trust is not safe
```

Every error carries data (``module``, ``stage``, ``filename``, ``lineno``) as well as prose, so that
callers and log processors do not have to parse messages.
"""

from __future__ import annotations

from typing import Literal, get_args

Stage = Literal["load", "compile", "execute", "compatibility", "verify", "safepoint", "health"]
STAGES: tuple[Stage, ...] = get_args(Stage)


class HotpatchError(Exception):
    """Base class of every error hotpatch raises."""


class PatchRejected(HotpatchError):
    """A patch was refused, or applied and then rolled back; the live module is as it was.

    Attributes:
        module: the module's name.
        stage: where it was refused: one of ``STAGES``.
        reason: the bare reason, without the location prefix.
        filename: the file the refusal points at, when there is one.
        lineno: the line in ``filename``, when there is one.
    """

    def __init__(
        self,
        module: str,
        stage: Stage,
        reason: str,
        *,
        filename: str | None = None,
        lineno: int | None = None,
    ) -> None:
        self.module = module
        self.stage: Stage = stage
        self.reason = reason
        self.filename = filename
        self.lineno = lineno
        where = filename or module
        if filename and lineno:
            where = f"{filename}:{lineno}"
        super().__init__(f"{where}: patch of {module!r} refused at {stage}: {reason}")

    def details(self) -> dict[str, object]:
        """The refusal as log context: module, stage, reason, filename, lineno."""
        return {
            "module": self.module,
            "stage": self.stage,
            "reason": self.reason,
            "filename": self.filename,
            "lineno": self.lineno,
        }

    def __reduce__(self) -> tuple[object, ...]:  # keep pickling (multiprocessing) working
        return (
            _rebuild_rejected,
            (self.module, self.stage, self.reason, self.filename, self.lineno),
        )


def _rebuild_rejected(
    module: str, stage: Stage, reason: str, filename: str | None, lineno: int | None
) -> PatchRejected:
    return PatchRejected(module, stage, reason, filename=filename, lineno=lineno)


class RolloutFailed(HotpatchError):
    """A gunicorn rollout stopped before every worker ran the new release.

    Attributes:
        reason: why it stopped.
        rolled_back: whether every worker is back on the known-good release.
        worker_pid: the worker that failed, when one did.
    """

    def __init__(self, reason: str, *, rolled_back: bool, worker_pid: int | None = None) -> None:
        self.reason = reason
        self.rolled_back = rolled_back
        self.worker_pid = worker_pid
        state = "rolled back" if rolled_back else "NOT rolled back"
        super().__init__(f"rollout failed ({state}): {reason}")


class HealthCheckTimeout(RolloutFailed, TimeoutError):
    """A new worker did not become healthy before its deadline."""


class ConfigError(HotpatchError, ValueError):
    """A setting has a value hotpatch cannot use."""


class InsecurePath(HotpatchError, PermissionError):
    """A path hotpatch would trust (its runtime directory, a file in it) is not safe to use.

    It is a link, not what it should be, owned by another user, or open to other users. Nothing was
    changed: hotpatch never repairs (``chmod``) what it did not create.

    Attributes:
        path: the offending path.
        reason: what is wrong with it.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
