"""``hotpatch demo``: a live demonstration on an embedded default, no external service.

Owns the demonstration and the harness it runs on: ``inprocess`` patches an embedded HTTP app under
client load; ``rollout`` rolls a real gunicorn's workers under load; ``harness`` starts gunicorn on a
pre-bound 127.0.0.1 socket and generates counted load (the integration tests and the benchmarks use
it too).

May import every other part of hotpatch but ``cli``; nothing but ``hotpatch.cli`` imports it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from hotpatch.demo.inprocess import run_in_process_demo

__all__ = ["run_demo"]


def run_demo(*, clients: int = 4, print_fn: Callable[[str], object] = print) -> int:
    """Run every part of the demo; the exit code is 0 when all of them succeeded.

    When gunicorn and Flask are installed, the in-process part is followed by a good and a broken
    rolling reload of a real gunicorn.
    """
    results = {"in-process hot patching": run_in_process_demo(print_fn, clients=clients)}
    missing = [name for name in ("gunicorn", "flask") if importlib.util.find_spec(name) is None]
    if missing:
        print_fn(
            f"\n(gunicorn rolling reload part skipped: {', '.join(missing)} not installed; "
            "install hotpatch[demo])"
        )
    else:
        from hotpatch.demo.rollout import run_rollout_demo

        try:
            results["gunicorn rolling reload"] = run_rollout_demo(print_fn=print_fn)
        except Exception as exc:  # reported plainly; the exit code says it failed
            print_fn(f"\ngunicorn rolling reload part failed: {type(exc).__name__}: {exc}")
            results["gunicorn rolling reload"] = False
    print_fn("\n== Summary ==")
    for name, passed in results.items():
        print_fn(f"{name}: {'OK' if passed else 'FAILED'}")
    return 0 if all(results.values()) else 1
