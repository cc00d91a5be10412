"""Routing keys and sticky buckets: the properties a canary's ramp relies on."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading

import pytest

from hotpatch.routing import MAX_KEY_BYTES, bucket, current_routing_key, routing_key

STEPS = (0.01, 0.05, 0.25, 0.50, 1.00)


def test_ten_thousand_keys_through_a_ramp_never_go_back_and_each_share_is_within_a_point() -> None:
    keys = [f"user-{i}" for i in range(10_000)]
    was_new = dict.fromkeys(keys, False)
    for share in STEPS:
        on_new = 0
        for key in keys:
            with routing_key(key):
                is_new = bucket("trial-7") < share
            assert is_new or not was_new[key], f"{key} went from new to old at {share:.0%}"
            was_new[key] = is_new
            on_new += is_new
        assert abs(on_new / len(keys) - share) <= 0.01, (share, on_new)


def test_a_key_has_one_bucket_per_run_and_runs_are_independent() -> None:
    assert bucket("run-a", "user-1") == bucket("run-a", "user-1")
    first = {i for i in range(20_000) if bucket("run-a", i) < 0.05}
    second = {i for i in range(20_000) if bucket("run-b", i) < 0.05}
    # Independent 5% cohorts share about 5% of 5% of the keys (50 of 20,000), not most of them.
    assert len(first & second) < 120, len(first & second)


def test_keys_of_different_types_never_share_an_encoding() -> None:
    assert bucket("r", 1) != bucket("r", "1")
    assert bucket("r", b"1") != bucket("r", "1")
    with routing_key(7):
        assert current_routing_key() == b"i7"


def test_the_bucket_is_the_same_in_every_process_whatever_the_hash_seed() -> None:
    here = bucket("trial-42", "user-42")
    code = "from hotpatch.routing import bucket; print(repr(bucket('trial-42', 'user-42')))"
    for seed in ("1", "2", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert float(out) == here


def test_nested_blocks_restore_the_outer_key_and_a_decorator_works_too() -> None:
    assert current_routing_key() is None
    with routing_key("outer"):
        with routing_key("inner"):
            assert current_routing_key() == b"sinner"
        assert current_routing_key() == b"souter"
    assert current_routing_key() is None

    @routing_key("decorated")
    def handler() -> bytes | None:
        return current_routing_key()

    assert handler() == b"sdecorated"
    assert current_routing_key() is None


def test_the_key_follows_copied_contexts_and_never_leaks_between_threads_or_tasks() -> None:
    seen: dict[str, bytes | None] = {}
    with routing_key("request-1"):
        context = contextvars.copy_context()
        copied = threading.Thread(
            target=context.run, args=(lambda: seen.update(copied=current_routing_key()),)
        )
        bare = threading.Thread(target=lambda: seen.update(bare=current_routing_key()))
        for thread in (copied, bare):
            thread.start()
            thread.join(30)
    assert seen == {"copied": b"srequest-1", "bare": None}

    async def serve(key: str) -> bytes | None:
        with routing_key(key):
            await asyncio.sleep(0)  # let the other task run inside its own block
            return current_routing_key()

    async def both() -> list[bytes | None]:
        return list(await asyncio.gather(serve("a"), serve("b")))

    assert asyncio.run(both()) == [b"sa", b"sb"]


def test_a_call_without_a_key_is_drawn_at_random_and_gets_the_share_on_average() -> None:
    draws = [bucket("trial-1") for _ in range(20_000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert 0.04 < sum(d < 0.05 for d in draws) / len(draws) < 0.06


@pytest.mark.parametrize(
    ("key", "error"),
    [(True, TypeError), (1.5, TypeError), (None, TypeError), ("x" * MAX_KEY_BYTES, ValueError)],
)
def test_keys_that_are_not_identities_are_refused(key: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        routing_key(key)  # type: ignore[arg-type]
