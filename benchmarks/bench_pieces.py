"""Feasibility study: compile a module statement by statement, reusing unchanged statements' code.

    .venv/bin/python benchmarks/bench_pieces.py --sdists /tmp/replay_sdists
    .venv/bin/python benchmarks/bench_pieces.py --packages six --no-import-context

Not used by the engine. ``importlib.reload`` is almost all ``compile`` (six: about 10 ms of its
11 ms), and so is the floor of ``patch_many``: the candidate is the whole module compiled and
executed. The one way below that floor is to compile only the top-level statements an edit
touched and take the previous version's code for the others (moved ones with their line numbers
shifted), then run the pieces in order in the candidate's namespace. This script measures, on
the replay's real release steps (``bench_replay.PACKAGES``), what that would cost and whether
it gives the very code objects a whole-module compile gives (it must, for a patched process to
behave like a restarted one):

- ``whole``: ``compile`` of the new source (what ``reload`` and the engine pay today);
- ``cold``: every statement compiled apart (a module's first patch: no pieces kept yet);
- ``warm``: only statements whose text is new compiled, the others taken from the previous
  release's pieces (shifted when they moved), as every later patch would;
- ``exact``: whether the function and class-body code objects, in order, equal those of the
  whole-module compile (``==`` on code objects: bytecode, constants, names, line table).

A statement compiled alone does not see the rest of the module: on 3.11 and later the compiler
emits a plain attribute load instead of a method call for ``name.attr(...)`` when ``name`` is
bound by an import anywhere at module level (``is_import_originated``), so the pieces are
compiled with the module's import-bound names declared in dead code after them
(``--no-import-context`` shows the difference); likewise, 3.12 and later compile
``super().attr`` as one instruction only when the module's own scope has no symbol ``super``
(``_safe_super = super`` in ``unittest/mock.py``), so a statement mentioning ``super`` in such a
module declares it too. Future imports are passed as flags, and a
statement is compiled again when they, or the import-bound names it reads, changed. 3.13 keeps a
class's first line in a constant (``__firstlineno__``), so a statement holding a class is
compiled at its own lines there and compiled again when it moves, not shifted. What the
study does not settle (module-level code only: the trailing ``return`` of each piece, a later
bare string taken as a docstring, ``__annotations__`` set up late, constants no longer shared
between statements) is listed in docs/performance.md.
"""

from __future__ import annotations

import argparse
import ast
import functools
import gc
import statistics
import symtable
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_replay as replay  # noqa: E402

from hotpatch.engine.alignment import split_lines  # noqa: E402
from hotpatch.engine.statements import StatementIndex, parse  # noqa: E402

_FUTURE_MASK = 0
for _name in __import__("__future__").all_feature_names:
    _FUTURE_MASK |= getattr(__import__("__future__"), _name).compiler_flag

_CLASS_LINE_CONST = sys.version_info >= (3, 13)


class Piece(NamedTuple):
    """One statement's code, and what it was compiled with."""

    first: int  # its first line
    code: types.CodeType
    flags: int  # the module's future flags
    reads: frozenset[str]  # the names its code reads (attribute names too)
    imported: frozenset[str]  # those of them an import binds at module level
    padded: bool  # compiled at its own lines (3.13, a class): compiled again when moved
    with_super: bool  # compiled with the module's own symbol "super"


Pieces = dict[str, Piece]  # by statement text


def spans(text: str) -> list[tuple[int, int]]:
    """Top-level statements' lines (statements sharing a line merged), from the engine's index."""
    out: list[list[int]] = []
    for unit in StatementIndex.build(parse(text), text).units:
        if out and unit.start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], unit.end)
        else:
            out.append([unit.start, unit.end])
    return [(a, b) for a, b in out]


def import_bound(tree: ast.Module) -> list[str]:
    """Names an import binds at module level (blocks included, not function or class bodies)."""
    names: list[str] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    names.append(alias.asname or alias.name.partition(".")[0])
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(
                child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)
            )
            for handler in getattr(node, "handlers", ()):
                todo.extend(handler.body)
            for case in getattr(node, "cases", ()):
                todo.extend(case.body)
    return sorted(set(names))


def shifted(code: types.CodeType, delta: int) -> types.CodeType:
    if not delta:
        return code
    consts = tuple(
        shifted(c, delta) if isinstance(c, types.CodeType) else c for c in code.co_consts
    )
    return code.replace(co_firstlineno=code.co_firstlineno + delta, co_consts=consts)


class Layout:
    """What compiling a text's pieces needs besides the text (found once, outside the timing:
    the engine would have it from its statement index)."""

    def __init__(self, text: str, filename: str, *, context: bool) -> None:
        tree = parse(text)
        self.filename = filename
        self.lines = split_lines(text)
        self.spans = spans(text)
        self.flags = compile(text, filename, "exec", dont_inherit=True).co_flags & _FUTURE_MASK
        names = import_bound(tree) if context else []
        self.imported = frozenset(names)
        # 3.12+ compiles super().attr as one instruction unless the module's own scope has a
        # symbol "super" (``_safe_super = super``, mock.py): then a statement that mentions
        # super is compiled with that symbol too
        self.top_super = (
            context and "super" in symtable.symtable(text, filename, "exec").get_identifiers()
        )


def compile_pieces(layout: Layout, previous: Pieces) -> tuple[list[types.CodeType], Pieces, int]:
    """The text's pieces (code per statement, in order), reusing ``previous``'s where the
    statement's text is the same; how many statements were compiled."""
    codes: list[types.CodeType] = []
    kept: Pieces = {}
    compiled = 0
    for first, last in layout.spans:
        body = "\n".join(layout.lines[first - 1 : last])
        known = previous.get(body)
        with_super = layout.top_super and "super" in body
        if (
            known is not None
            and known.flags == layout.flags
            and known.imported == known.reads & layout.imported
            and known.with_super == with_super
            and (known.first == first or not known.padded)
        ):
            # same text and context: no name it reads has become, or stopped being, bound by
            # an import
            piece = known._replace(first=first, code=shifted(known.code, first - known.first))
        else:
            # the import-bound names its text mentions (a superset of those it reads), declared
            # in dead code after it: the symbol table sees them, no instruction is emitted
            mentioned = [name for name in layout.imported if name in body]
            dead = [f"import {', '.join(mentioned)}"] if mentioned else []
            if with_super:
                dead.append("super")
            source = body + (f"\nif 0: {'; '.join(dead)}\n" if dead else "\n")
            padded = _CLASS_LINE_CONST and "class" in body
            if padded:
                # at its own lines: 3.13 keeps a class's first line in a constant
                # (__firstlineno__) that a shift does not change
                source = "\n" * (first - 1) + source
            code = compile(source, layout.filename, "exec", flags=layout.flags, dont_inherit=True)
            if not padded:
                code = shifted(code, first - 1)
            reads = read_names(code)
            piece = Piece(
                first, code, layout.flags, reads, reads & layout.imported, padded, with_super
            )
            compiled += 1
        codes.append(piece.code)
        kept[body] = piece
    return codes, kept, compiled


def read_names(code: types.CodeType) -> frozenset[str]:
    return frozenset(code.co_names).union(*(read_names(c) for c in nested(code)))


def nested(code: types.CodeType) -> list[types.CodeType]:
    """Every function and class-body code object under ``code``, depth first, in order."""
    out = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out.append(const)
            out.extend(nested(const))
    return out


def first_difference(a: types.CodeType, b: types.CodeType) -> str:
    skip = ("co_lnotab", "co_lines", "co_positions")
    for attr in dir(a):
        if attr.startswith("co_") and attr not in skip and getattr(a, attr) != getattr(b, attr):
            return f"{a.co_qualname if hasattr(a, 'co_qualname') else a.co_name}: {attr}"
    return f"{a.co_name}: ?"


def cpu_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


def study(pkg: replay.Package, trees: dict[str, Path], args: argparse.Namespace) -> list[dict]:
    rows = []
    for a, b in zip(pkg.versions, pkg.versions[1:]):
        if a not in trees or b not in trees:
            continue
        old_root, new_root = trees[a] / pkg.src, trees[b] / pkg.src
        for name in pkg.import_names:
            files = sorted((new_root / name).rglob("*.py")) or [new_root / f"{name}.py"]
            for new_file in files:
                rel = new_file.relative_to(new_root)
                old_file = old_root / rel
                new_text = new_file.read_text(encoding="utf-8")
                old_text = old_file.read_text(encoding="utf-8") if old_file.exists() else ""
                if new_text == old_text or not old_text:
                    continue
                filename = str(rel)
                old_layout = Layout(old_text, filename, context=args.context)
                layout = Layout(new_text, filename, context=args.context)
                _, old_pieces, _ = compile_pieces(old_layout, {})
                whole = compile(new_text, filename, "exec", dont_inherit=True)
                warm_codes, _, compiled = compile_pieces(layout, old_pieces)
                want = nested(whole)
                got = [c for piece in warm_codes for c in [piece, *nested(piece)][1:]]
                exact = want == got
                why = ""
                if not exact:
                    bad = [(w, g) for w, g in zip(want, got) if w != g]
                    why = first_difference(*bad[0]) if bad else "count differs"
                row = {
                    "step": f"{pkg.dist} {a} -> {b}",
                    "module": filename,
                    "statements": len(warm_codes),
                    "compiled": compiled,
                    "whole_ms": cpu_ms(
                        functools.partial(compile, new_text, filename, "exec", dont_inherit=True),
                        args.repeat,
                    ),
                    "cold_ms": cpu_ms(functools.partial(compile_pieces, layout, {}), args.repeat),
                    "warm_ms": cpu_ms(
                        functools.partial(compile_pieces, layout, old_pieces), args.repeat
                    ),
                    "exact": exact,
                    "why": why,
                }
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", default=",".join(replay.PACKAGES))
    parser.add_argument("--sdists", action="append", default=[])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--no-import-context",
        dest="context",
        action="store_false",
        help="compile each statement alone (shows what 3.11+ compiles differently)",
    )
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hotpatch-pieces-") as work:
        search = [replay.DATA, *(Path(d) for d in args.sdists)]
        for dist in args.packages.split(","):
            pkg = replay.PACKAGES[dist]
            trees = {}
            for version in pkg.versions:
                sdist = replay.find_sdist(pkg, version, search)
                if sdist is not None:
                    trees[version] = replay.extract(sdist, Path(work) / dist / version)
            rows += study(pkg, trees, args)
    print(f"Python {sys.version.split()[0]}, import context: {args.context}")
    print("| step | module | statements | compiled | whole ms | cold ms | warm ms | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['step']} | {r['module']} | {r['statements']} | {r['compiled']} | "
            f"{r['whole_ms']:.2f} | {r['cold_ms']:.2f} | {r['warm_ms']:.2f} | "
            f"{'yes' if r['exact'] else 'NO: ' + r['why']} |"
        )
    whole = sum(r["whole_ms"] for r in rows) or 1.0
    cold = sum(r["cold_ms"] for r in rows)
    warm = sum(r["warm_ms"] for r in rows)
    print(
        f"total: whole {whole:.1f} ms, cold {cold:.1f} ms ({cold / whole:.2f}x), "
        f"warm {warm:.1f} ms ({warm / whole:.2f}x); "
        f"exact {sum(r['exact'] for r in rows)}/{len(rows)} modules"
    )
    return rows


if __name__ == "__main__":
    main()
