"""A module compiled by the statement gives the code, the namespace and the errors of a whole compile.

``hotpatch.engine.pieces`` compiles each top-level statement apart and takes the previous
version's code for statements that did not change. Every function and class body it yields must
equal (``==`` on code objects: bytecode, constants, names, lines) what ``compile`` of the whole
text yields, the module body must leave the same names, and a source a restart refuses must be
refused with the same error.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from hotpatch.engine import candidate, pieces
from hotpatch.engine.compare import nested_codes
from hotpatch.engine.statements import StatementIndex, parse
from hotpatch.errors import PatchRejected

# Each the whole of a module; every one holds something a statement compiled alone would get
# wrong if it were compiled without its module around it.
MODULES = {
    "imports and method calls": """
        import os
        import os.path as osp
        from json import dumps as to_json

        def f(p):
            return os.path.join(p, osp.basename(p)), os.getcwd(), to_json.__call__(p)

        class A:
            def g(self):
                return os.getpid()
        """,
    "imports in blocks": """
        try:
            import json
        except ImportError:
            json = None
        if 0:
            import dead
        if __name__ == "__main__":
            import sys

        def f(x):
            return json.dumps(x), dead.thing(), sys.exit()
        """,
    "a module-level super": """
        _safe_super = super

        class A:
            def __init__(self):
                super().__init__()

        class B(A):
            def __init__(self):
                _safe_super(B, self).__init__()
                super().__init__()
        """,
    "docstring and bare strings": '''
        """The module's docstring."""

        X = 1
        """A bare string after a statement: not the docstring."""

        def f():
            return X
        ''',
    "a bare string that shares a line": """
        X = 1
        "not the docstring"; Y = lambda: X
        """,
    "annotations read before the first annotated name": """
        before = dict(__annotations__) if "__annotations__" in globals() else None
        x: int = 1
        y: "str"

        def f(a: int) -> int:
            return a
        """,
    "future annotations": """
        \"\"\"Doc.\"\"\"
        from __future__ import annotations

        import os

        def f(a: os.PathLike) -> list[int]:
            return os.fspath(a)

        class C:
            x: int
        """,
    "statements sharing lines": """
        import os; A = os.getcwd(); B = lambda: os.getpid()
        def f(): return A
        class K: pass; z = 1
        """,
    "decorators, closures, comprehensions, generators": """
        import functools

        def deco(fn):
            @functools.wraps(fn)
            def wrapper(*a):
                return fn(*a)
            return wrapper

        @deco
        def f(n):
            return [i * i for i in range(n) if functools.reduce(lambda a, b: a, [i])]

        async def g():
            yield 1

        TABLE = {k: v for k, v in zip("ab", range(2))}
        """,
    "classes at many lines": """
        class A:
            x = 1

            def f(self):
                return self.x



        class B(A):
            @property
            def y(self):
                return 2

        class C(B):
            class Inner:
                def h(self):
                    return 3
        """,
}


def source_of(name: str) -> str:
    return textwrap.dedent(MODULES[name]).lstrip("\n")


def units_of(text: str) -> Any:
    return StatementIndex.build(parse(text), text).units


def nested(code: types.CodeType) -> list[types.CodeType]:
    return list(nested_codes(code))


@pytest.fixture(name="compiled")
def _compiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources ``pieces`` compiles from now on (``compile`` counted, still called)."""
    sources: list[str] = []
    real_compile = compile

    def counting(source: str, *args: Any, **kwargs: Any) -> Any:
        sources.append(source)
        return real_compile(source, *args, **kwargs)

    monkeypatch.setattr(pieces, "compile", counting, raising=False)
    return sources


def assert_same_as_whole(text: str, made: pieces.ModuleCode) -> None:
    whole = compile(text, "m.py", "exec", dont_inherit=True)
    assert made.pieces is not None, "compiled whole: nothing was compared"
    assert [c for code in made.codes for c in nested(code)] == nested(whole)
    ran: dict[str, Any] = {"__name__": "m"}
    made.run(ran)
    reference: dict[str, Any] = {"__name__": "m"}
    exec(whole, reference)
    assert ran.keys() == reference.keys()
    for key in ("__doc__", "__annotations__", "before"):
        assert ran.get(key) == reference.get(key), key


@pytest.mark.parametrize("name", sorted(MODULES))
def test_by_the_statement_gives_the_code_of_a_whole_compile(name: str) -> None:
    text = source_of(name)
    assert_same_as_whole(text, pieces.compile_module(text, "m.py", units_of(text), None))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_statements_moved_or_unchanged_take_the_previous_code(
    name: str, compiled: list[str]
) -> None:
    old = source_of(name)
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    lines = old.splitlines(keepends=True)
    # three lines inserted after the first statement: everything below moves
    first_end = units_of(old)[0].end
    new = "".join([*lines[:first_end], "\n# moved\n\n", *lines[first_end:]])
    compiled.clear()
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(new, after)
    # Only 3.13 compiles a moved class again (it keeps the class's first line as a constant).
    moved = list(after.pieces or {})[1:]
    expected = sum("class" in body for body in moved) if sys.version_info >= (3, 13) else 0
    assert len([s for s in compiled if "__future__" not in s]) == expected


def test_an_edit_compiles_the_changed_statement_only(compiled: list[str]) -> None:
    old = "import os\n\n" + "".join(
        f"def f{i}():\n    return os.getpid() + {i}\n\n" for i in range(30)
    )
    new = old.replace("+ 7\n", "+ 70\n")
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    compiled.clear()
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert len(compiled) == 1 and "+ 70" in compiled[0]
    assert_same_as_whole(new, after)
    # the unchanged statements' code is the very same objects
    assert sum(a is b for a, b in zip(before.codes, after.codes)) == 30


def test_a_new_import_recompiles_the_statements_that_read_its_name() -> None:
    old = "def f(p):\n    return path.join(p)\n\nX = 1\n"
    new = "from os import path\n\n" + old  # path is now bound by an import: 3.11+ compiles f anew
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(new, after)


def test_future_flags_changed_recompile_everything() -> None:
    body = "def f(a: int) -> int:\n    return a\n"
    old = '"""Doc."""\n\n' + body
    new = '"""Doc."""\nfrom __future__ import annotations\n\n' + body
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(new, after)
    f: dict[str, Any] = {}
    after.run(f)
    assert f["f"].__annotations__ == {"a": "int", "return": "int"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("X = 1\nfrom __future__ import annotations\n", "from __future__ imports must occur"),
        ("X = 1\nglobal X\n", "assigned to before global declaration"),
        ("def f():\n    pass\nreturn 1\n", "'return' outside function"),
        ("x = 1\ny = (\n", "was never closed"),
    ],
)
def test_a_source_a_restart_refuses_gets_the_whole_compiles_error(text: str, message: str) -> None:
    with pytest.raises(SyntaxError) as whole:
        compile(text, "m.py", "exec", dont_inherit=True)
    previous, _ = candidate.compile_source("m", "X = 0\n", "m.py")
    with pytest.raises(PatchRejected) as refused:
        candidate.compile_source("m", text, "m.py", previous=previous)
    assert refused.value.stage == "compile"
    assert message in str(refused.value) and message in str(whole.value)
    assert refused.value.lineno == whole.value.lineno


def test_a_module_level_global_is_compiled_whole() -> None:
    text = "X = 1\n\ndef f():\n    return X\n\nif True:\n    global Y\n    Y = 2\n"
    made = pieces.compile_module(text, "m.py", units_of(text), None)
    assert made.pieces is None and len(made.codes) == 1
    ran: dict[str, Any] = {}
    made.run(ran)
    assert ran["Y"] == 2


def test_a_piece_traceback_names_the_file_and_line() -> None:
    text = "X = 1\n\n\ndef f():\n    return 1\n\nY = 1 / 0\n"
    made = pieces.compile_module(text, "m.py", units_of(text), None)
    with pytest.raises(ZeroDivisionError) as raised:
        made.run({})
    frame = raised.traceback[-1]
    assert (Path(frame.path).name, frame.lineno + 1) == ("m.py", 7)


@pytest.mark.parametrize("module", ["typing", "argparse", "collections", "unittest.mock", "ast"])
def test_standard_library_modules_compile_to_the_same_code(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    text = Path(spec.origin).read_text(encoding="utf-8")
    made = pieces.compile_module(text, spec.origin, units_of(text), None)
    whole = compile(text, spec.origin, "exec", dont_inherit=True)
    assert made.pieces is not None
    assert [c for code in made.codes for c in nested(code)] == nested(whole)


def test_a_statement_of_another_file_name_is_compiled_again() -> None:
    # Code names its file (tracebacks, inspect): a version read from another path is compiled
    # for that path even where its text is the same.
    text = "def f():\n    return 1\n\nX = 2\n"
    before = pieces.compile_module(text, "old/m.py", units_of(text), None)
    after = pieces.compile_module(text, "new/m.py", units_of(text), before.pieces)
    assert {c.co_filename for code in after.codes for c in [code, *nested(code)]} == {"new/m.py"}


CLASS = '''
import os
_safe_super = super


class Base:
    def __init__(self):
        self.made = os.getpid()


class Cache(Base):
    """A class whose methods are left out of its compile when their text is unchanged."""

    __marker = object()
    size = lambda self: 0

    def __init__(self, maxsize, key=lambda k: k):
        super().__init__()
        self.__maxsize = maxsize

    @property
    def maxsize(self):
        return self.__maxsize

    def short(self):
        x

    def classy(self):
        return __class__

    def unsafe(self):
        return _safe_super(Cache, self).__init__()

    async def fetch(self, key):
        async with key:
            yield os.path.join(
                "a", "b"
            )

    def one_liner(self): return 1

    def edited(self):
        return 1
'''


def class_versions() -> tuple[str, str]:
    old = textwrap.dedent(CLASS).lstrip("\n")
    new = old.replace("        return 1\n", "        return 2\n").replace(
        "class Base:", "# a line above\n\nclass Base:"
    )
    assert new != old
    return old, new


@pytest.mark.skipif(
    sys.version_info >= (3, 13),
    reason="3.13 compiles a changed class whole: its body holds what its methods assign",
)
def test_a_class_edit_takes_its_unchanged_methods_code(compiled: list[str]) -> None:
    old, new = class_versions()
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    compiled.clear()
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(new, after)
    [cache] = [s for s in compiled if "class Cache" in s]
    # the methods whose text is the same are not in what was compiled; the edited one is
    assert "self.__maxsize = maxsize" not in cache and "os.path.join" not in cache
    assert "return 2" in cache and "def one_liner(self): return 1" in cache
    # and their code is the previous version's, at their new lines
    old_methods = {c.co_name: c for c in nested(before.codes[-1])}
    new_methods = {c.co_name: c for c in nested(after.codes[-1])}
    for name in ("__init__", "maxsize", "short", "classy", "unsafe", "fetch"):
        assert new_methods[name].co_consts is old_methods[name].co_consts, name
        assert new_methods[name].co_firstlineno == old_methods[name].co_firstlineno + 2


@pytest.mark.skipif(
    sys.version_info >= (3, 13),
    reason="3.13 compiles a changed class whole: its body holds what its methods assign",
)
def test_a_class_method_of_another_context_is_compiled_again(compiled: list[str]) -> None:
    # ``os`` no longer bound by an import: 3.11+ compiles ``os.getpid()`` differently, so the
    # method reading it is compiled again; the others still come from the previous version.
    old, _ = class_versions()
    new = old.replace("import os\n", "os = __import__('os')\n").replace("return 1\n", "return 3\n")
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    compiled.clear()
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(new, after)
    [cache] = [s for s in compiled if "class Cache" in s]
    assert "os.path.join" in cache and "self.__maxsize = maxsize" not in cache


@pytest.mark.parametrize(
    "edit",
    [
        ("    def classy(self):\n        return __class__\n", ""),  # the class cell's user gone
        ("        super().__init__()\n", ""),  # __init__ no longer uses the cell
        ("class Cache(Base):", "class Cache(Base, object):"),  # the header changed
        (
            "    __marker = object()\n",
            "    __marker = object()\n    def late(self):\n        pass\n",
        ),
        ("return self.__maxsize", "return self._Cache__maxsize"),
    ],
)
def test_class_edits_give_the_code_of_a_whole_compile(edit: tuple[str, str]) -> None:
    old, _ = class_versions()
    new = old.replace(*edit)
    assert new != old
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    assert_same_as_whole(new, pieces.compile_module(new, "m.py", units_of(new), before.pieces))
    # and back, from the edited version's pieces
    after = pieces.compile_module(new, "m.py", units_of(new), before.pieces)
    assert_same_as_whole(old, pieces.compile_module(old, "m.py", units_of(old), after.pieces))


@pytest.mark.parametrize(
    "body",
    [
        "x",
        "xy",
        "(x)",
        "__class__",
        "super().f()",
        "return (\n            1\n        )",
        "'''doc'''",
    ],
)
def test_a_left_out_body_of_any_width_gives_the_same_class(body: str) -> None:
    # The expression put in a body's place ends where the body ended (positions of the
    # class body's instructions); a body too short for it is compiled as written.
    old = f"class A:\n    def f(self):\n        {body}\n\n    def g(self):\n        return 1\n"
    new = old.replace("return 1", "return 2")
    before = pieces.compile_module(old, "m.py", units_of(old), None)
    assert_same_as_whole(new, pieces.compile_module(new, "m.py", units_of(new), before.pieces))
