"""Source -> compiled, executed, isolated module object (the *candidate*).

A candidate is built apart from the live module: its source is decoded, parsed, compiled and executed
into a fresh module object that is never put in ``sys.modules``, so nothing live can see it. Every
failure becomes a ``PatchRejected`` naming the file, the line where there is one, and the stage.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import sys
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hotpatch.engine.alignment import aligned
from hotpatch.engine.comments import comment_edits, rekeyed
from hotpatch.engine.pieces import ModuleCode, Pieces, compile_module
from hotpatch.engine.statements import StatementIndex, collector_paused, parse
from hotpatch.errors import PatchRejected

DEFAULT_MAX_SOURCE_BYTES = 4 * 1024 * 1024

# Attributes of the live module object that the candidate inherits, so that relative imports,
# ``__file__``-relative paths and pickling by qualified name behave as in the live module.
_INHERITED_DUNDERS = ("__file__", "__cached__", "__path__", "__package__", "__loader__", "__spec__")


@dataclass(frozen=True)
class Source:
    """A module's source text, its file name, its content hash and its statement index; and,
    once compiled by ``compile_source``, each statement's code (``pieces``) for the next version.

    ``pieces`` is a cache by statement text, each piece saying what it was compiled with: the
    live version may hold those of a later text found to change nothing (a comment edited), so
    that the next version is compiled from them and not from nothing."""

    text: str
    filename: str
    sha256: str
    index: StatementIndex = field(repr=False, compare=False)
    pieces: Pieces | None = field(default=None, repr=False, compare=False)


@dataclass
class Candidate:
    """A new version of a module, executed apart from the live one."""

    name: str
    source: Source
    module: types.ModuleType
    namespace: dict[str, object]


def live_module(name: str, *, importing_ok: bool = False) -> types.ModuleType:
    """Return the live module ``name`` if it can be patched from Python source.

    Args:
        name: the module's name in ``sys.modules``.
        importing_ok: accept a module whose import is still running (to read its baseline
            source, not to patch it).

    Raises:
        PatchRejected: stage ``load``: not imported, not a module, not Python source, or (unless
            ``importing_ok``) still being imported.
    """
    if not isinstance(name, str) or not name:
        raise PatchRejected(str(name), "load", "a module name must be a non-empty string")
    module = sys.modules.get(name)
    if module is None:
        hint = ""
        if "." in name and isinstance(sys.modules.get(name.rpartition(".")[0]), types.ModuleType):
            hint = f" ({name.rpartition('.')[2]!r} may be an attribute, not a module)"
        raise PatchRejected(
            name, "load", f"module {name!r} is not imported{hint}; hotpatch changes live modules"
        )
    if not isinstance(module, types.ModuleType):
        raise PatchRejected(name, "load", f"sys.modules[{name!r}] is not a module object")
    filename = getattr(module, "__file__", None)
    if not importing_ok and getattr(getattr(module, "__spec__", None), "_initializing", False):
        # Another thread (or this one, from the module's own top level) is still executing its
        # import: a patch now would be overwritten, in part, by the rest of the import.
        raise PatchRejected(
            name,
            "load",
            f"{name!r} is still being imported (its top-level code has not finished); "
            "patch it once the import is complete",
            filename=str(filename) if filename else None,
        )
    if not filename:
        what = "a built-in module"
        if getattr(module, "__path__", None) is not None:
            what = "a namespace package (a directory without __init__.py)"
        raise PatchRejected(name, "load", f"{name!r} is {what} with no Python source to patch")
    if not str(filename).endswith(".py"):
        raise PatchRejected(
            name,
            "load",
            f"{name!r} is loaded from {filename}, not from Python source "
            "(extension modules need a restart or a rolling reload)",
            filename=str(filename),
        )
    return module


def read_source_file(name: str, filename: str, *, max_bytes: int) -> bytes:
    """Read a module's file, refusing at ``load`` when it is missing, unreadable or too large."""
    path = Path(filename)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PatchRejected(
                name,
                "load",
                f"file is {size:,} bytes, over the {max_bytes:,}-byte limit (max_source_bytes)",
                filename=filename,
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise PatchRejected(
            name, "load", "the module's file no longer exists", filename=filename
        ) from None
    except IsADirectoryError:
        raise PatchRejected(
            name, "load", "the module's file is a directory", filename=filename
        ) from None
    except OSError as exc:
        raise PatchRejected(
            name, "load", f"cannot read the file: {exc.strerror or exc}", filename=filename
        ) from None


def decode_source(name: str, data: str | bytes, filename: str, *, max_bytes: int) -> str:
    """Decode source bytes as Python does (PEP 263 cookie, UTF-8 default), refusing at ``load``."""
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise PatchRejected(
                name,
                "load",
                f"source is {len(data):,} characters, over the {max_bytes:,} limit "
                "(max_source_bytes)",
                filename=filename,
            )
        return data
    if not isinstance(data, bytes | bytearray):
        raise PatchRejected(
            name,
            "load",
            f"source must be str or bytes, not {type(data).__name__}",
            filename=filename,
        )
    if len(data) > max_bytes:
        raise PatchRejected(
            name,
            "load",
            f"source is {len(data):,} bytes, over the {max_bytes:,}-byte limit (max_source_bytes)",
            filename=filename,
        )
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise PatchRejected(
            name,
            "load",
            "source contains a NUL byte: not a Python file",
            filename=filename,
            lineno=line,
        )
    try:
        return importlib.util.decode_source(bytes(data))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PatchRejected(
            name,
            "load",
            f"source is not valid {exc.encoding} (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            filename=filename,
            lineno=line,
        ) from None
    except (SyntaxError, LookupError) as exc:  # a bad coding cookie
        raise PatchRejected(
            name, "load", f"cannot decode the source: {exc}", filename=filename
        ) from None


def text_sha256(text: str) -> str:
    """The content hash that identifies a version: SHA-256 of the decoded source text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def compile_source(
    name: str,
    text: str,
    filename: str,
    *,
    previous: Source | None = None,
    sha256: str | None = None,
) -> tuple[Source, ModuleCode]:
    """Index ``text``'s statements and compile it, with the garbage collector paused.

    The statement index is derived from ``previous`` when given, re-parsing only the top-level
    statements the edit touched; the code is compiled by the statement (``pieces``), taking
    ``previous``'s code for the statements that did not change, where that gives the code a
    whole compile gives, else whole. ``sha256``: ``text_sha256(text)`` when the caller has it
    (a 17,000-line table costs a millisecond to hash).

    Raises:
        PatchRejected: stage ``compile``.
    """
    with collector_paused():
        return _compile_source(name, text, filename, previous, sha256)


def _compile_source(
    name: str, text: str, filename: str, previous: Source | None, sha256: str | None
) -> tuple[Source, ModuleCode]:
    try:
        if name == "__main__":
            tree = parse(text, filename=filename)
            if not any(_is_main_guard(stmt) for stmt in tree.body):
                raise PatchRejected(
                    name,
                    "compile",
                    'the script has no `if __name__ == "__main__":` block, so its new version '
                    "would run the whole program again inside the patch; put the program's "
                    "top-level code under such a block",
                    filename=filename,
                )
            code = ModuleCode(
                (compile(_definitions_only(tree, name), filename, "exec", dont_inherit=True),)
            )
            index = None
            if previous is not None:
                index = previous.index.updated(
                    previous.text, text, keep=lambda stmt: not _is_main_guard(stmt)
                )
            if index is None:
                index = StatementIndex.build(_definitions_only(tree, name), text)
        else:
            index, pieces = None, previous.pieces if previous is not None else None
            unchanged, lined = False, None
            if previous is not None:
                lined = aligned(previous.text, text)
                if pieces:
                    # Statements changed in comments only take the previous code, found by their
                    # new texts too; the index re-reads the other changes alone (if any: else
                    # the version has the same statements and the previous code).
                    edits = comment_edits(lined, previous.index.units)
                    if edits.pairs:
                        pieces = rekeyed(lined, previous.index.units, edits.pairs, pieces)
                        if not edits.others:
                            index, unchanged = previous.index, True
                    lined = lined._replace(hunks=edits.others)
                if index is None:
                    index = previous.index.updated(previous.text, text, lined=lined)
            if index is None:
                index = StatementIndex.build(parse(text, filename=filename), text)
            new_lines = lined.new if lined is not None else None
            code = compile_module(text, filename, index.units, pieces, lines=new_lines)
            if unchanged:
                code = replace(code, unchanged=True)
    except SyntaxError as exc:
        raise _syntax_rejection(name, exc, filename, text) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise PatchRejected(name, "compile", f"cannot compile: {exc}", filename=filename) from None
    sha = sha256 if sha256 is not None else text_sha256(text)
    return Source(text, filename, sha, index, code.pieces), code


def without_repeated_registrations(
    source: Source, code: ModuleCode, *, previous: Source | None, live: dict[str, object]
) -> ModuleCode:
    """``code``, compiled again without the registrations the live module already holds.

    A definition registered on an object the module imports (``from app import app`` then
    ``@app.route("/view")``, ``@router.get(...)``) is registered there again by the candidate:
    the framework may refuse that once it serves (Flask: "setup method 'route' can no longer be
    called"), or keep a second entry. When the decorators and the signature are the same as in
    the live version and the live name is still the function its own statement made (the
    decorator returned it unchanged), a restart would make the same registration of the new
    function, and the live registration holds the live function, which takes the new code in
    place. Such decorators are replaced by the identity (at the same lines, so the code objects
    are those of a normal compile); anything else runs as written.
    """
    if previous is None:
        return code
    before = {
        unit.bound[0][1]: unit.reads.decorated
        for unit in previous.index.units
        if unit.reads.decorated and unit.bound and not unit.bound[0][0]
    }
    imported: set[str] = set()
    starts: set[int] = set()
    for unit in source.index.units:
        reads = unit.reads
        if reads.imports:
            imported.update(name for scope, name in unit.bound if not scope)
            continue
        if reads.kind != "def" or not reads.decorated or not unit.bound:
            continue
        name = unit.bound[0][1]
        bases = {base for base, _ in reads.attrs if base in reads.decorators}
        function = live.get(name)
        if (
            before.get(name) == reads.decorated
            and reads.decorators <= bases <= imported
            and type(function) is types.FunctionType
            and function.__globals__ is live
            and function.__name__ == name
            and function.__code__.co_firstlineno == unit.start
        ):
            starts.add(unit.start)
    if not starts:
        return code
    tree = parse(source.text, filename=source.filename)
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef)
            and stmt.decorator_list
            and min(d.lineno for d in stmt.decorator_list) in starts
        ):
            stmt.decorator_list = [
                ast.copy_location(_identity_decorator(), d) for d in stmt.decorator_list
            ]
    ast.fix_missing_locations(tree)
    return ModuleCode((compile(tree, source.filename, "exec", dont_inherit=True),))


def _identity_decorator() -> ast.expr:
    """``(lambda f: f)``: a decorator that returns the function as it is."""
    arg = ast.arg(arg="f")
    return ast.Lambda(
        args=ast.arguments(posonlyargs=[], args=[arg], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=ast.Name(id="f", ctx=ast.Load()),
    )


def source_from_text(name: str, text: str, filename: str) -> Source | None:
    """A ``Source`` for a baseline: ``None`` when it does not parse (the index is then unknown)."""
    try:
        tree = parse(text, filename=filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    tree = _definitions_only(tree, name)
    sha = text_sha256(text)
    return Source(text, filename, sha, StatementIndex.build(tree, text))


def _definitions_only(tree: ast.Module, name: str) -> ast.Module:
    """For ``__main__``, drop top-level ``if __name__ == "__main__":`` blocks.

    That block is the program itself, already running: a new version of a script brings new
    definitions, and must not start the program a second time inside the patching thread.
    """
    if name != "__main__":
        return tree
    kept = [stmt for stmt in tree.body if not _is_main_guard(stmt)]
    if len(kept) == len(tree.body):
        return tree
    return ast.Module(body=kept, type_ignores=tree.type_ignores)


def _is_main_guard(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If) or not isinstance(stmt.test, ast.Compare):
        return False
    test = stmt.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    mains = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(mains) == 1


def _syntax_rejection(
    name: str, exc: SyntaxError, filename: str, text: str | None = None
) -> PatchRejected:
    detail = exc.msg
    line = exc.text
    if text is not None and exc.lineno:  # the parser may quote the file on disk, not our text
        lines = text.splitlines()
        line = lines[exc.lineno - 1] if 0 < exc.lineno <= len(lines) else None
    if line and line.strip():
        detail += f": {line.strip()!r}"
    return PatchRejected(
        name, "compile", detail, filename=exc.filename or filename, lineno=exc.lineno
    )


def build_candidate(
    live: types.ModuleType,
    source: Source,
    code: ModuleCode,
    *,
    siblings: Mapping[str, types.ModuleType] | None = None,
    on_executed: Callable[[dict[str, object]], object] | None = None,
) -> Candidate:
    """Execute ``code`` (compiled from ``source``) into a fresh module object shaped like ``live``.

    Args:
        live: the live module the candidate will replace.
        source: its new source.
        code: the source's compiled module body (``compile_source``).
        siblings: candidates of other modules of the same change set, by name: the candidate's
            own import statements get those instead of the live modules, so a name new in one
            module of a change set can be imported by another. Nothing else sees them.
        on_executed: called with the candidate's namespace once its code has run, whether it
            raised or not (the pipeline undoes registrations it made in live containers).

    Raises:
        PatchRejected: stage ``execute``; nothing of the candidate is visible.
    """
    name = live.__name__
    module = types.ModuleType(name, None)
    namespace: dict[str, object] = module.__dict__
    for attr in _INHERITED_DUNDERS:
        if hasattr(live, attr):
            namespace[attr] = getattr(live, attr)
    seeded = _seed_submodules(live, namespace)
    live_builtins = live.__dict__.get("__builtins__", builtins)
    namespace["__builtins__"] = (
        _builtins_importing(live_builtins, siblings, namespace) if siblings else live_builtins
    )
    try:
        code.run(namespace)  # the candidate's own import-time code, isolated in its namespace
    except BaseException as exc:  # SystemExit and KeyboardInterrupt refuse too
        raise _execute_rejection(name, exc, source.filename, source.index) from None
    finally:
        namespace["__builtins__"] = live_builtins
        if on_executed is not None:
            on_executed(namespace)
    for attr, submodule in seeded.items():
        if namespace.get(attr) is submodule and attr not in live.__dict__:
            del namespace[attr]  # not bound on the live package either (its own code deleted it)
    return Candidate(name, source, module, namespace)


def _seed_submodules(live: types.ModuleType, namespace: dict[str, object]) -> dict[str, object]:
    """A package's candidate sees its imported submodules as attributes, as ``__init__`` does.

    In a restart, ``from .sub import x`` in ``__init__`` imports ``pkg.sub``, and the import system
    binds ``sub`` on the package before the next line runs (so ``del sub`` or ``sub.y`` work).
    In the candidate, ``pkg.sub`` is already in ``sys.modules``, so the import binds nothing: the
    candidate gets every imported direct submodule beforehand. Those the candidate's code did not
    re-bind and the live package does not have are taken out again after it ran.
    """
    if not hasattr(live, "__path__"):
        return {}
    prefix = f"{live.__name__}."
    seeded: dict[str, object] = {}
    for full, submodule in list(sys.modules.items()):
        if not full.startswith(prefix) or "." in full[len(prefix) :]:
            continue
        if isinstance(submodule, types.ModuleType):
            seeded[full[len(prefix) :]] = submodule
    for attr, found in seeded.items():
        namespace.setdefault(attr, found)
    return seeded


def _builtins_importing(
    live_builtins: object, siblings: Mapping[str, types.ModuleType], namespace: dict[str, object]
) -> dict[str, object]:
    """Builtins whose ``__import__`` resolves the change set's modules to their candidates."""
    source = vars(live_builtins) if isinstance(live_builtins, types.ModuleType) else live_builtins
    table: dict[str, object] = dict(source)  # type: ignore[call-overload]
    real_import = table["__import__"]
    assert callable(real_import)
    package = namespace.get("__package__") or ""

    def candidate_import(
        name: str,
        globals: Mapping[str, object] | None = None,
        locals: Mapping[str, object] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> object:
        absolute = importlib.util.resolve_name("." * level + name, str(package)) if level else name
        if fromlist and absolute in siblings:
            return siblings[absolute]
        if not fromlist and "." not in name and absolute in siblings:
            return siblings[absolute]
        return real_import(name, globals, locals, fromlist, level)

    table["__import__"] = candidate_import
    return table


def _execute_rejection(
    name: str, exc: BaseException, filename: str, index: StatementIndex | None = None
) -> PatchRejected:
    lineno = None
    at_top = False
    for frame, line in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == filename:
            lineno = line  # the innermost line of the module's own code
            at_top = frame.f_code.co_name == "<module>"
    hint = _registration_refused(index, lineno) if at_top and index is not None else ""
    if isinstance(exc, SystemExit):
        reason = f"the module called sys.exit({exc.code!r}) at import"
    elif isinstance(exc, KeyboardInterrupt):
        reason = "KeyboardInterrupt raised at import"
    else:
        reason = f"{type(exc).__name__} at import: {exc}{hint}"
    return PatchRejected(name, "execute", reason, filename=filename, lineno=lineno)


def _registration_refused(index: StatementIndex, lineno: int | None) -> str:
    """A hint when the module's top level failed in a decorator that registers the definition on
    an object imported from another module (``from app import app``; ``@app.route(...)``): the
    candidate runs that registration again on the live object, which may refuse it once serving
    (Flask: "setup method ... can no longer be called"); a restart makes it before serving."""
    imported: set[str] = set()
    for unit in index.units:
        if unit.reads.imports:
            imported.update(name for scope, name in unit.bound if not scope)
        elif unit.start <= (lineno or 0) <= unit.end and unit.reads.kind != "plain":
            on = sorted(unit.reads.decorators & imported)
            if on:
                return (
                    f" (raised by the decorator of {unit.bound[0][1]}, which registers it on "
                    f"{on[0]}, a live object this module imports: re-running the module's top "
                    "level registers it again, and the live object refused it; a restart makes "
                    "the registration before serving: a rolling reload carries this change)"
                )
            break
    return ""
