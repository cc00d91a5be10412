"""First contact with a module: its baseline is what runs, and the one-time work is done early.

A module met for the first time (patched, or found holding a changed module's objects) takes its
file as the baseline its statements are compared with; a file rewritten after hotpatch first saw
the module is not what runs. The index of every loaded module's namespace is built at ``track``,
and a module that holds a changed module's objects is only parsed when its source may import one
of the changed modules (issue 8, latency).
"""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import pytest

from hotpatch import Engine, PatchRejected
from hotpatch.engine.derived import ModuleChange
from hotpatch.engine.fidelity import (
    NamespaceIndex,
    imported_modules,
    may_import,
    packages_not_named,
)

KINDS = "KINDS = ['a', 'b']\n\ndef label(kind):\n    return kind.upper()\n"
KINDS_NEW = "KINDS = ['a', 'b', 'c']\n\ndef label(kind):\n    return kind.upper()\n"


def _rewrite(module: types.ModuleType, text: str) -> None:
    Path(str(module.__file__)).write_text(text, encoding="utf-8")


def test_a_holder_rewritten_on_disk_since_first_seen_is_refused_not_trusted(make_module) -> None:
    kinds = make_module(KINDS)
    table = make_module(
        f"import {kinds.__name__} as kinds\n\nTABLE = {{k: kinds.label(k) for k in kinds.KINDS}}\n"
    )
    engine = Engine()
    engine.track(kinds.__name__)  # hotpatch sees every loaded module, `table` included
    # A deployment rewrites `table` (not patched yet): its new text no longer reads `kinds`, but
    # the code that runs does. Taking the file as the baseline would leave TABLE on the old KINDS.
    _rewrite(table, "TABLE = {'fixed': 'FIXED'}\n")
    with pytest.raises(PatchRejected) as caught:
        engine.patch(kinds.__name__, source=KINDS_NEW)
    assert caught.value.stage == "compatibility"
    assert table.__name__ in caught.value.reason and "rewritten" in caught.value.reason
    assert kinds.KINDS == ["a", "b"] and table.TABLE == {"a": "A", "b": "B"}  # nothing changed


def test_a_module_rewritten_since_first_seen_has_an_unknown_baseline(make_module) -> None:
    mod = make_module("CACHE = {}\n\ndef f():\n    return 1\n")
    cache = mod.CACHE
    cache["kept"] = True
    engine = Engine()
    engine.track(__name__)  # builds the index: `mod`'s file is recorded as imported
    _rewrite(mod, "CACHE = {'other': 1}\n\ndef f():\n    return 1\n")  # not what runs
    # Against that text, CACHE's statement would look edited and take a new empty dict; what
    # runs was `CACHE = {}`, unchanged: the live dict and its contents stay.
    engine.patch(mod.__name__, source="CACHE = {}\n\ndef f():\n    return 2\n")
    assert mod.f() == 2
    assert mod.CACHE is cache and cache == {"kept": True}


def test_track_builds_the_namespace_index_ahead_of_the_first_patch(make_module) -> None:
    mod = make_module("X = 1\n")
    engine = Engine()
    index = engine._namespace_ids
    assert mod.__name__ not in index._state
    engine.track(mod.__name__)
    assert mod.__name__ in index._state and "sys" in index._state


def test_a_module_docstring_change_does_not_make_every_module_a_holder(make_module) -> None:
    lib = make_module("def f():\n    return 1\n")  # no docstring: __doc__ is None
    plain = make_module("def g():\n    return 2\n")  # none either: same None, its own
    index = NamespaceIndex()
    change = ModuleChange(frozenset({"__doc__"}), frozenset({"__doc__"}))
    found = index.holders(lib.__name__, change)
    assert plain.__name__ not in found
    assert not [name for name in found if sys.modules[name].__doc__ is None]


def test_a_holder_that_imports_none_of_the_changed_modules_is_not_parsed(make_module) -> None:
    kinds = make_module(KINDS)
    # holds the same list object, but not through an import of `kinds`: nothing to re-derive
    other = make_module("SHARED = None\n")
    other.SHARED = kinds.KINDS
    engine = Engine()
    engine.track(kinds.__name__)
    engine.patch(kinds.__name__, source=KINDS_NEW)
    assert other.__name__ not in engine._histories  # never parsed, no history started
    assert kinds.KINDS == ["a", "b", "c"]


IMPORT_FORMS = [
    ("from . import (\n    a,  # see f(x)\n    keys,\n)\n", "pkg", True),
    ("import os\nx = d.keys()\n", "pkg", False),
    ("from pkg import \\\n    keys\n", "", True),
    ("if x: from .keys import y\n", "pkg", True),
    ("import pkg.keys as k\n", "", True),
    ("x = 1; import pkg.keys\n", "", True),
    ("def f():\n    from .keys import z\n", "pkg", True),
    ("from _pytest.compat import keys\n", "_pytest", False),
    ("from ..func import x\n", "pkg.sub", True),
    ("from ..pkg.func import x\n", "pkg.sub", False),  # pkg.pkg.func
    ("from . import x\n", "pkg", False),
    ("from.keys import x\n", "pkg", True),
    ("from . keys import x\n", "pkg", True),
    ('"""Docs: from the keys import nothing."""\n', "pkg", False),
    ("from pkg import func as f2, other\n", "", True),
    ("from ñ import keys\n", "pkg", True),  # not ASCII: not filtered
]


@pytest.mark.parametrize(("text", "package", "expected"), IMPORT_FORMS)
def test_may_import_finds_every_form_of_import(text: str, package: str, expected: bool) -> None:
    assert may_import(text, package, ["pkg.keys", "pkg.func"]) is expected


@pytest.mark.parametrize(("text", "package", "expected"), IMPORT_FORMS)
def test_packages_not_named_never_leaves_out_a_package_an_import_may_name(
    text: str, package: str, expected: bool
) -> None:
    absent = packages_not_named(text.encode("utf-8"), package, ["pkg", "elsewhere"])
    assert ("pkg" not in absent) or not expected
    assert "elsewhere" in absent or not text.isascii()


def test_packages_not_named_reads_the_bytes_only_where_they_are_the_text() -> None:
    assert packages_not_named(b"import os\n", "", ["pkg"]) == {"pkg"}
    assert packages_not_named(b"import os\n", "pkg.sub", ["pkg"]) == set()  # relative imports
    # an encoding declared: ASCII bytes may decode to other text (utf-7: "+AHA-kg" is "pkg")
    assert packages_not_named(b"# coding: utf-7\nimport +AHA-kg\n", "", ["pkg"]) == set()
    assert packages_not_named(b"#!/bin/python\n# -*- coding: latin-1 -*-\n", "", ["pkg"]) == set()
    # a third line is no cookie: the file is UTF-8, and its bytes are its text
    assert packages_not_named(b"import os\n\n# coding: latin-1\n", "", ["pkg"]) == {"pkg"}
    assert packages_not_named("import \u00f1\n".encode(), "", ["pkg"]) == set()  # not ASCII
    assert packages_not_named(b"import os\n", "", ["\u00f1"]) == {"\u00f1"}


def test_packages_not_named_agrees_with_the_full_scan_on_random_imports() -> None:
    rng = random.Random(8)
    words = ["pkg", "pkgs", "apkg", "sub", "os", "x", "pkg.sub", ".", "..", ".sub", "..pkg"]
    for _ in range(3000):
        lines = []
        for _ in range(rng.randint(1, 4)):
            module = rng.choice(words)
            if rng.random() < 0.5 and not module.startswith("."):
                lines.append(f"import {module}")
            else:
                lines.append(f"from {module} import {rng.choice(words[:6])}")
        text = "\n".join(lines) + "\n"
        package = rng.choice(["", "pkg", "pkg.sub", "other", "other.pkg"])
        named = imported_modules(text, package)
        assert named is not None
        for top in packages_not_named(text.encode(), package, ["pkg", "sub", "os"]):
            assert not any(m.partition(".")[0] == top for m in named), (text, package, top)


def test_a_holder_whose_file_cannot_name_the_changed_package_is_not_decoded(make_module) -> None:
    kinds = make_module("import json, os\n\n" + KINDS)
    other = make_module("import os\n")  # holds the module object the patch unbinds: a holder
    engine = Engine()
    engine.track(kinds.__name__)
    engine.patch(kinds.__name__, source="import json\n\n" + KINDS_NEW, allow_removals=True)
    # met as a holder (it holds the `os` the patch unbinds), read, and not decoded: its bytes
    # do not name the changed module
    seen = engine._holder_imports[other.__name__]
    assert seen.named is None and kinds.__name__.partition(".")[0] in seen.absent
    assert other.__name__ not in engine._histories


def test_may_import_a_package_itself_through_a_relative_import() -> None:
    assert may_import("from . import x\n", "pkg", ["pkg"])
    assert may_import("from .. import x\n", "pkg.sub", ["pkg"])
    assert not may_import("from ._x import y\n", "other", ["pkg"])
    assert not may_import("anything", "pkg", [])
