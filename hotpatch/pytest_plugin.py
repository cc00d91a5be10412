"""pytest plugin: fixtures for testing hot patches.

- ``hotpatch_engine``: a fresh ``Engine`` per test, so history and registrations do not leak.
- ``hotpatch_check``: ``hotpatch_check("pkg.mod", source=None)`` runs the guard on a new version
  (load, compile, execute, compatibility, verifiers) without committing it, so a CI job can prove a
  change is hot-patchable; it raises ``PatchRejected`` with the stage when it is not.

Imports stay cheap: the plugin is loaded in every pytest run of an environment with hotpatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hotpatch.engine import Engine, PatchResult


@pytest.fixture(name="hotpatch_engine")
def _hotpatch_engine() -> Engine:
    from hotpatch.engine import Engine

    return Engine()


@pytest.fixture(name="hotpatch_check")
def _hotpatch_check(hotpatch_engine: Engine) -> Callable[..., PatchResult]:
    def check(
        module: str, *, source: str | bytes | None = None, allow_removals: bool = False
    ) -> PatchResult:
        return hotpatch_engine.check(module, source=source, allow_removals=allow_removals)

    return check
