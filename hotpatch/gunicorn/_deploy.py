"""The decisions of a deploy, apart from processes: when the master may start one, what a release
changed, when the release switch is safe, and what the workers' answers add up to.

The problem: an in-place deploy is a two-phase commit across processes that keep serving. The
master must refuse to start one while workers are changing anyway (a rollout, a worker still
booting, a damaged release), must never let a worker start on the new release while the others
may still refuse it, and must never let a worker be spawned unseen between phase 1 and phase 2
(it would stay on the old code while the others commit: a mixed server). The coordinator must
turn a dozen answers, some of them missing, into one true verdict.

The mechanism: pure functions over the master's records and the workers' answers (no signals,
no sockets), unit-tested alone (``tests/unit/test_deploy_decisions.py``): ``begin_problem``
(before the snapshot), ``changed_files`` (Python modules versus anything else, from the two
manifests), ``switch_problem`` (the workers now must be exactly the workers that accepted, all
still on the known-good release), and ``phase_verdict`` (every worker accepted, or the first
refusal with its reason).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hotpatch.gunicorn._releases import Manifest

STRATEGIES = ("auto", "in-place", "rolling", "canary", "blue-green")
"""What ``hotpatch deploy --strategy`` takes."""

PHASE_OK = {
    "prepare": ("accepted", "unchanged"),
    "commit": ("committed",),
    "health": ("healthy",),
    "confirm": ("deployed",),
    "rollback": ("rolled_back",),
}


def begin_problem(
    *,
    disabled_reason: str | None,
    rollout_id: int | None,
    deploy_id: int | None,
    workers: Mapping[int, tuple[str | None, str]],
    known_good: str | None,
    size: int,
) -> str | None:
    """Why the master cannot start a deploy now, or ``None``.

    Args:
        disabled_reason: why rolling reloads are off in this master, if they are.
        rollout_id: the rollout running, if any.
        deploy_id: the deploy running, if any.
        workers: every live worker: ``pid -> (release, phase)``.
        known_good: the known-good release.
        size: how many workers the server should have.
    """
    if disabled_reason is not None:
        return disabled_reason
    if rollout_id is not None:
        return f"rollout {rollout_id} is running; deploy again when it has ended"
    if deploy_id is not None:
        return f"deploy {deploy_id} is running; one deploy at a time"
    if known_good is None:
        return "the master has no known-good release"
    if len(workers) != size:
        return (
            f"{len(workers)} workers run where {size} are configured; deploy when they are all up"
        )
    for pid, (release, phase) in sorted(workers.items()):
        if release != known_good:
            return f"worker {pid} runs release {release}, not the known-good {known_good}"
        if phase != "ready":
            return f"worker {pid} is {phase}, not ready; deploy when every worker serves"
    return None


def changed_files(old: Manifest, new: Manifest) -> tuple[list[str], list[str]]:
    """What ``new`` changed from ``old``: ``(Python sources, every other file or link)``.

    Directories alone are not changes; a file that appeared, went away or has other content is.
    """
    python: list[str] = []
    other: list[str] = []
    for rel in sorted(set(old) | set(new)):
        before, after = old.get(rel), new.get(rel)
        kinds = {r.kind for r in (before, after) if r is not None}
        if kinds == {"D"}:
            continue
        if (
            before is not None
            and after is not None
            and (before.kind, before.digest) == (after.kind, after.digest)
        ):
            continue
        name = os.fsdecode(rel)
        is_source = rel.endswith(b".py") and kinds == {"F"}
        (python if is_source else other).append(name)
    return python, other


def switch_problem(
    participants: Mapping[int, str], workers: Mapping[int, str | None]
) -> str | None:
    """Why new workers may not start on the new release yet, or ``None``.

    Args:
        participants: the workers the deploy began with (``pid -> release``).
        workers: the live workers now (``pid -> release``).
    """
    started = sorted(set(workers) - set(participants))
    if started:
        return (
            f"worker {started[0]} started during the deploy and took no part in phase 1; "
            "nothing was committed anywhere: deploy again"
        )
    gone = sorted(set(participants) - set(workers))
    if gone:
        return (
            f"worker {gone[0]} exited during the deploy; nothing was committed anywhere: "
            "deploy again"
        )
    for pid, release in sorted(participants.items()):
        if workers.get(pid) != release:
            return f"worker {pid} now runs release {workers.get(pid)}, not {release}"
    return None


@dataclass(frozen=True)
class Verdict:
    """What one phase's answers add up to.

    Attributes:
        ok: every worker answered with a success of that phase.
        failed: the workers that did not (with their reason), in pid order.
        unknown: the workers whose outcome is unknown (no answer in time, connection lost).
    """

    ok: bool
    failed: tuple[tuple[int, str], ...] = ()
    unknown: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        """The first failure, as one line (empty when ``ok``)."""
        if not self.failed:
            return ""
        pid, why = self.failed[0]
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return f"worker {pid}: {why}{more}"


def phase_verdict(phase: str, answers: Mapping[int, dict[str, Any]]) -> Verdict:
    """Judge the answers of ``phase``: ``pid -> answer`` (an answer with ``"unknown": True``
    stands for a worker whose outcome is not known)."""
    expected = PHASE_OK[phase]
    failed: list[tuple[int, str]] = []
    unknown: list[int] = []
    for pid, answer in sorted(answers.items()):
        if answer.get("outcome") in expected:
            continue
        if answer.get("unknown"):
            unknown.append(pid)
        message = answer.get("message") or answer.get("outcome") or "no answer"
        failed.append((pid, f"{answer.get('outcome', 'unknown')}: {message}"))
    return Verdict(not failed, tuple(failed), tuple(unknown))


def committed(answers: Mapping[int, dict[str, Any]]) -> list[int]:
    """The workers that may have committed: said so, or gave no answer to the commit."""
    return sorted(
        pid
        for pid, answer in answers.items()
        if answer.get("outcome") == "committed" or answer.get("unknown")
    )


def pids(values: Iterable[Any]) -> list[int]:
    """The positive ints among ``values`` (pids from a record), sorted."""
    return sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0})
