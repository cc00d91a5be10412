"""Parallel runs in process: the new version of a module beside the live one, per call.

``hotpatch.patch`` verifies a candidate before its commit, but the candidate never sees a real
call before it replaces the old code. A parallel run gives it real calls first, at the finest
grain there is (one call), with no proxy and no second server: ``canary`` (a growing share of
calls, judged at every step, committed at 100% or rolled back at the first bad judgement),
``shadow`` (callers always get the old outcome, sampled calls are run on the new version too
and compared) and ``experiment`` (A/B: a fixed sticky split, outcomes ``record``-ed per arm).

Owns: the dispatch of a live function's calls between two versions (``_dispatch``: trampolines
of every function kind, version affinity, per-arm figures) and the trial itself (``_trial``:
the handle, the controller thread that ramps and judges, shadow comparison, experiment metrics).

May import: ``hotpatch.engine`` (guard, prepared commit, safe point, history), ``hotpatch.errors``,
``hotpatch.judge`` (the statistics), ``hotpatch.routing`` (routing keys and buckets),
``hotpatch.health``, ``hotpatch._log`` and the standard library (``openfeature`` lazily, only for
``flag=``).
"""

from hotpatch.trial._trial import (
    ArmStatus,
    ExperimentReport,
    MetricReport,
    Mismatch,
    Trial,
    TrialResult,
    TrialStatus,
    active_trials,
    canary,
    experiment,
    record,
    shadow,
)

__all__ = [
    "ArmStatus",
    "ExperimentReport",
    "MetricReport",
    "Mismatch",
    "Trial",
    "TrialResult",
    "TrialStatus",
    "active_trials",
    "canary",
    "experiment",
    "record",
    "shadow",
]
