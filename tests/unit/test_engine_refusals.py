"""Refusals only where a restart is truly needed (issue 8, the replay's refusals left).

Each test is a minimal module pair for a refusal the replay benchmark found on real releases and
that a restart did not need: the patch now applies, and the patched module behaves like the new
version imported afresh (a restart); what does need a restart stays refused, with nothing changed.
Then the defects those refusals had hidden, found when the replay's steps went through (each one
an applied-but-different step), and two more found on the way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hotpatch import Engine, PatchRejected

MakePackage = Callable[[dict[str, str]], str]


@pytest.fixture(name="make_package")
def _make_package(tmp_path: Path) -> Iterator[MakePackage]:
    """Write a package (file name -> source) under tmp_path; return its unique name."""
    made: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def make(files: dict[str, str]) -> str:
        name = f"hp_ref_{uuid.uuid4().hex[:10]}"
        (tmp_path / name).mkdir()
        for filename, source in files.items():
            (tmp_path / name / filename).write_text(textwrap.dedent(source), encoding="utf-8")
        made.append(name)
        return name

    yield make
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.split(".")[0] in made]:
        del sys.modules[name]


def _restarted(source: str, tmp_path: Path) -> types.ModuleType:
    """``source`` imported afresh under a name of its own: what a restarted process has."""
    name = f"hp_fresh_{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- a descriptor under a name the type itself owns (toolz's Compose.__name__) ----------------------


COMPOSE = """
class Compose:
    def __init__(self, *funcs):
        self.funcs = funcs

    @property
    def __name__(self):
        return "_of_".join(f.__name__ for f in self.funcs)

class Proxy:
    __class__ = property(lambda self: int)
"""

COMPOSE_NEW = COMPOSE.replace('"_of_".join', '"_then_".join').replace(
    "lambda self: int", "lambda self: str"
)


def test_a_property_named_like_an_attribute_of_the_type_takes_its_new_getter(
    make_module, tmp_path: Path
) -> None:
    """``Compose.__dict__["__name__"]`` is a property: only instances see it (the type's own
    ``__name__`` wins on the class). Its getter changed: the getter takes the new code in place,
    nothing is assigned on the class, and instances answer as a restart's do."""
    mod = make_module(COMPOSE)
    compose_cls, proxy_cls = mod.Compose, mod.Proxy
    name_prop, class_prop = compose_cls.__dict__["__name__"], proxy_cls.__dict__["__class__"]
    made_before = mod.Compose(len, str)
    result = Engine().patch(mod.__name__, source=COMPOSE_NEW)
    assert {"Compose.__name__", "Proxy.__class__"} <= set(result.changed)
    fresh = _restarted(COMPOSE_NEW, tmp_path)
    assert made_before.__name__ == fresh.Compose(len, str).__name__ == "len_then_str"
    assert mod.Proxy().__class__ is fresh.Proxy().__class__ is str
    # The classes themselves: same objects, same names, same metaclass; the descriptors in place.
    assert mod.Compose is compose_cls and compose_cls.__name__ == "Compose"
    assert mod.Proxy is proxy_cls and type(proxy_cls) is type and proxy_cls.__name__ == "Proxy"
    assert compose_cls.__dict__["__name__"] is name_prop
    assert proxy_cls.__dict__["__class__"] is class_prop


@pytest.mark.parametrize(
    ("source", "new", "member"),
    [
        # A plain value: setattr would rename the class itself.
        (
            "class K:\n    __name__ = 'first'\n",
            "class K:\n    __name__ = 'second'\n",
            "K.__name__ changed",
        ),
        # Removed: delattr would try to delete the type's own __name__.
        (
            "class K:\n    @property\n    def __name__(self):\n        return 'k'\n",
            "class K:\n    pass\n",
            "K.__name__ was removed",
        ),
    ],
)
def test_what_would_assign_the_types_own_attribute_is_refused(
    make_module, source: str, new: str, member: str
) -> None:
    mod = make_module(source)
    cls = next(v for v in vars(mod).values() if isinstance(v, type))
    before = dict(cls.__dict__)
    with pytest.raises(PatchRejected, match=rf"{member}.*restart") as info:
        Engine().patch(mod.__name__, source=new, allow_removals=True)
    assert info.value.stage == "compatibility"
    assert type(cls) is type and cls.__name__ == cls.__qualname__ and dict(cls.__dict__) == before


# -- a definition that is new in this version, made by a decorator new in it (Stats) ---------------


STATS_OLD = """
def mean(values):
    return sum(values) / len(values)
"""

STATS_NEW = """
from dataclasses import dataclass

@dataclass(frozen=True, slots=True)
class Stats:
    size: int
    mean: float

def mean(values):
    return sum(values) / len(values)

def describe(values):
    return Stats(len(values), mean(values))
"""


def test_a_new_class_made_by_a_decorator_imported_in_the_same_version_is_added(
    make_module, tmp_path: Path
) -> None:
    """more-itertools 11.0.2 moved ``Stats`` (a ``@dataclass``) into ``recipes.py`` with its
    ``from dataclasses import dataclass``: the decorator name is new, and so is the class it makes.
    Nothing live was made by an older decorator, so no restart is needed: the class is added."""
    mod = make_module(STATS_OLD)
    result = Engine().patch(mod.__name__, source=STATS_NEW)
    assert {"Stats", "dataclass", "describe"} <= set(result.added)
    fresh = _restarted(STATS_NEW, tmp_path)
    stats = mod.describe([1, 2, 3])
    assert repr(stats) == repr(fresh.describe([1, 2, 3])) == "Stats(size=3, mean=2.0)"
    assert mod.Stats.__slots__ == fresh.Stats.__slots__ == ("size", "mean")
    assert mod.Stats.__dataclass_params__.frozen  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        stats.size = 4  # frozen, as in a restart
    assert mod.describe.__globals__ is vars(mod)  # a live function, not the candidate's


DECO = """
def make_deco(tag):
    def deco(cls):
        cls.tag = tag
        return cls
    return deco

deco = make_deco("v1")

@deco
class Kept:
    pass
"""


def test_a_kept_definition_whose_decorator_was_replaced_is_still_refused(make_module) -> None:
    """The boundary: ``Kept`` exists live, made by the old ``deco``, and its statement did not
    change, so the live class would stay as the old decorator made it while a restart decorates
    it with the new one: refused, as before."""
    mod = make_module(DECO)
    with pytest.raises(PatchRejected, match=r"needs a restart: .*decorator of Kept reads deco"):
        Engine().patch(mod.__name__, source=DECO.replace('"v1"', '"v2"'))
    assert mod.Kept.tag == "v1"


# -- found on the way: a live value of None was taken for the twin of any new value ---------------


FACTORY = """
def make(tag):
    def handler():
        return tag
    return handler

handler = make(None)

class K:
    value = property(lambda self: 1)
"""


def test_a_closure_or_descriptor_state_that_was_none_takes_its_new_value(
    make_module, tmp_path: Path
) -> None:
    """A cell or a descriptor's doc that held ``None`` matched any new value (``remap.get`` of an
    unmapped id answers ``None``): the patch applied and kept the old ``None``, unlike a restart."""
    mod = make_module(FACTORY)
    new = FACTORY.replace("make(None)", 'make("tag")').replace(
        "property(lambda self: 1)", 'property(lambda self: 1, doc="one")'
    )
    result = Engine().patch(mod.__name__, source=new)
    fresh = _restarted(new, tmp_path)
    assert mod.handler() == fresh.handler() == "tag"
    assert mod.K.__dict__["value"].__doc__ == fresh.K.__dict__["value"].__doc__ == "one"
    assert {"handler", "K.value"} <= set(result.changed)


def test_a_star_import_re_derived_in_a_change_set_binds_the_live_objects(make_package) -> None:
    """more-itertools 11.0.0 -> 11.0.1: ``recipes`` gained a name and ``__init__`` (``from .recipes
    import *``) changed its version. The ``__init__`` plan paired the candidate's ``all_equal`` with
    its own live value, over the pairing the ``recipes`` plan had made; re-planned with the star
    import forced, it dropped that pairing and bound the candidate's functions: ``mi.all_equal``
    read a namespace no module had (a test patching ``recipes.groupby`` failed)."""
    name = make_package(
        {
            "__init__.py": "from .sub import *\n__version__ = '1'\n",
            "sub.py": "__all__ = ['f']\n\ndef f():\n    return helper()\n\ndef helper():\n"
            "    return 1\n",
        }
    )
    pkg = importlib.import_module(name)
    sub = importlib.import_module(f"{name}.sub")
    engine = Engine()
    engine.track(name, sub.__name__)
    results = engine.patch_many(
        {
            sub.__name__: "__all__ = ['f', 'g']\n\ndef f():\n    return helper()\n\n"
            "def helper():\n    return 1\n\ndef g():\n    return 2\n",
            name: "from .sub import *\n__version__ = '2'\n",
        }
    )
    assert pkg.f is sub.f and pkg.f.__globals__ is vars(sub)
    assert pkg.g is sub.g and pkg.g() == 2
    sub.helper = lambda: 10  # what patching sub's globals (a test's mock) does
    assert pkg.f() == 10
    init = next(r for r in results if r.module == name)
    assert "f" not in init.changed and "g" in init.added


PROXY = """
class Proxy:
    __class__ = property(lambda self: dict)  # a proxy (werkzeug's LocalProxy, Django's LazyObject)

    def __init__(self, name):
        self.name = name

DEFAULT = Proxy("a")
"""


def test_a_new_instance_of_a_proxy_class_is_re_typed_to_the_live_class(make_module) -> None:
    """Re-typing a candidate's instance to the live class went through ``value.__class__ = K``,
    which runs a proxy's ``__class__`` property: "could not plan this change"."""
    mod = make_module(PROXY)
    live_class = mod.Proxy
    Engine().patch(mod.__name__, source=PROXY.replace('Proxy("a")', 'Proxy("b")'))
    assert type(mod.DEFAULT) is live_class and mod.DEFAULT.name == "b"
    assert mod.DEFAULT.__class__ is dict


def test_a_module_built_from_another_file_than_its_file_is_refused(make_module) -> None:
    """toolz's ``tlz`` is built from ``tlz/__init__.py`` by an import hook that copies ``toolz``'s
    namespace and then points ``tlz.__file__`` at ``toolz/__init__.py``. Patching ``tlz`` with
    that file's new version executed toolz's source as ``tlz``: its docstring became ``None``
    (applied but different). What a restart builds there, hotpatch cannot show: refused."""
    alias = make_module('"""The alias."""\n\nfrom os import path\n')
    other = make_module("def f():\n    return 1\n")
    alias.__file__ = other.__file__  # what the hook does
    with pytest.raises(PatchRejected, match=r"was built from .*not from its __file__.*restart"):
        Engine().patch(alias.__name__, source="def f():\n    return 2\n")
    assert alias.__doc__ == "The alias." and not hasattr(alias, "f")
