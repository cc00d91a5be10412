"""In-process hot patching, end to end: run with `python examples/inprocess/run.py`.

Threads call `pricing` in a loop while this script patches it: a fix is applied in place (existing
references and live objects run the new code, the cache keeps its contents), a change that breaks
the API is refused, a verifier refuses a wrong tax rate, a health check rolls back a broken
version, and the history rolls back on request. Every call is counted; none may fail.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pricing
from pricing import quote

import hotpatch

SOURCE = Path(pricing.__file__).read_text()
stop = threading.Event()
calls = {"ok": 0, "failed": 0}
basket = pricing.Basket().add("book", 10.0)  # a live instance


def caller() -> None:
    while not stop.is_set():
        try:
            quote("pen", 2.0)
            basket.total()
            calls["ok"] += 1
        except Exception as exc:
            calls["failed"] += 1
            print("call failed:", exc)


@hotpatch.verifier("pricing")
def sane_tax_rate(candidate) -> None:
    if not 0 <= candidate.TAX_RATE < 0.5:
        raise ValueError(f"TAX_RATE {candidate.TAX_RATE} is out of range")


@hotpatch.health_check("pricing")
def quotes_are_positive() -> None:
    assert pricing.quote("probe", 1.0) > 0, "quote() must be positive"


def attempt(label: str, source: str) -> None:
    try:
        result = hotpatch.patch("pricing", source=source)
        print(
            f"applied   {label}: changed {', '.join(result.changed)} ({result.duration_s * 1e3:.1f} ms)"
        )
    except hotpatch.PatchRejected as exc:
        print(f"refused   {label}: stage={exc.stage}: {exc}")


threads = [threading.Thread(target=caller) for _ in range(4)]
for t in threads:
    t.start()
try:
    print("before:", quote("book", 10.0), "basket:", basket.total())
    attempt(
        "a fix (add the handling fee)",
        SOURCE.replace("total = amount + tax(amount)", "total = amount + tax(amount) + 0.5"),
    )
    print(
        "after: ",
        quote("book", 10.0),
        "basket:",
        basket.total(),
        "cached quotes:",
        len(pricing.QUOTES),
    )
    attempt(
        "an API break", SOURCE.replace("def quote(sku, amount):", "def quote(sku):\n    amount = 1")
    )
    attempt("a bad constant", SOURCE.replace("TAX_RATE = 0.20", "TAX_RATE = 20"))
    attempt("a negative quote", SOURCE.replace("return total", "return -total"))
    for version in hotpatch.history("pricing"):
        print(
            f"history   {version.id} {version.outcome}{' (live)' if version.is_live else ''} {version.stage or ''}"
        )
    hotpatch.rollback("pricing")
    print("rolled back on request:", quote("book", 10.0))
finally:
    stop.set()
    for t in threads:
        t.join()
print(f"calls: {calls['ok']} ok, {calls['failed']} failed")
sys.exit(1 if calls["failed"] else 0)
