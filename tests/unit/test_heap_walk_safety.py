"""The heap walks meet objects other threads are still building: reading them must not crash.

``gc.get_referrers`` finds a tuple that ``tuple(iterator)`` is still filling (it is tracked by the
collector from the start), with empty slots after the ones filled so far. Indexing an empty slot
crashes the interpreter (a segmentation fault, the whole server gone). The stale-reference check
reads the referrers of replaced definitions; the case is made here in a child process, so that a
crash is a failed test rather than a lost test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc
    from hotpatch.engine import fidelity

    def old():
        return 1

    class Items:
        # three items, the first `old`: while the second is asked for, tuple() is half built
        def __init__(self):
            self.n = 0
            self.seen = None
        def __length_hint__(self):
            return 3
        def __iter__(self):
            return self
        def __next__(self):
            self.n += 1
            if self.n == 1:
                return old
            if self.n == 2:
                refs = [r for r in gc.get_referrers(old) if type(r) is tuple and len(r) == 3]
                assert refs and len(gc.get_referents(refs[0])) == 1  # two slots still empty
                self.seen = fidelity._foreign_holders(old, refs, {}, {}, {})
                del refs
                return "b"
            if self.n == 3:
                return "c"
            raise StopIteration

    items = Items()
    assert tuple(items) == (old, "b", "c")
    print(items.seen)
    """
)


def test_a_tuple_another_thread_is_building_is_named_not_read() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "['tuple']"  # held by a tuple: counted as a holder
