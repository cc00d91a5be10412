"""Registries a candidate fills that sit deeper than the modules it imports (issue 12).

Minimal module pairs, no framework: each registry here has the shape of one a framework keeps
(Django's ``Model._meta.apps.all_models``, a ``defaultdict`` of dicts two attributes away from the
model class; SQLAlchemy's class registry, a ``WeakValueDictionary`` whose entry becomes a slotted
marker holding weak references to the live class and the candidate's). A check, a refused patch
and an applied one must each leave the registry holding the live objects, exactly as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest

from hotpatch import Engine, PatchRejected

# A framework whose metaclass registers every class in a registry two attributes away from it.
FRAMEWORK = """
import warnings
from collections import defaultdict


class Apps:
    def __init__(self):
        self.all_models = defaultdict(dict)

    def register(self, label, cls):
        models = self.all_models[label]
        if cls.__name__.lower() in models:
            warnings.warn(f"Model '{label}.{cls.__name__.lower()}' was already registered. "
                          "Reloading models is not advised", RuntimeWarning, stacklevel=3)
        models[cls.__name__.lower()] = cls


apps = Apps()


class Options:
    def __init__(self, label):
        self.label = label
        self.apps = apps


class ModelBase(type):
    def __new__(mcs, name, bases, namespace):
        cls = super().__new__(mcs, name, bases, namespace)
        if bases:
            cls._meta = Options(namespace["__module__"])
            cls._meta.apps.register(cls._meta.label, cls)
        return cls


class Model(metaclass=ModelBase):
    pass
"""

MODELS = """
from {fw} import Model


class Note(Model):
    def title(self):
        return "v1"


class Tag(Model):
    pass
"""


def _registry(fw: object, label: str) -> dict[str, object]:
    return dict(fw.apps.all_models[label])  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["checked", "refused", "failed", "applied"])
def test_a_registry_two_attributes_away_keeps_the_live_classes(make_module, how) -> None:
    fw = make_module(FRAMEWORK)
    source = MODELS.format(fw=fw.__name__)
    mod = make_module(source)
    live = {"note": mod.Note, "tag": mod.Tag}
    assert _registry(fw, mod.__name__) == live
    v2 = source.replace('"v1"', '"v2"')
    engine = Engine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "checked":  # the warning is the class statement's, as SQLAlchemy's is
            assert "__warningregistry__" not in engine.check(mod.__name__, source=v2).added
        elif how == "refused":
            engine.verifier(mod.__name__)(lambda candidate: (_ for _ in ()).throw(ValueError("no")))
            with pytest.raises(PatchRejected, match="no"):
                engine.patch(mod.__name__, source=v2)
        elif how == "failed":  # registers both classes, then fails at import
            with pytest.raises(PatchRejected) as info:
                engine.patch(mod.__name__, source=v2 + "\nraise RuntimeError('late')\n")
            assert info.value.stage == "execute"
        else:
            engine.patch(mod.__name__, source=v2)
    registry = _registry(fw, mod.__name__)
    assert registry == live
    assert all(registry[key] is cls for key, cls in live.items())
    assert mod.Note().title() == ("v2" if how == "applied" else "v1")
    assert registry["note"]().title() == mod.Note().title()
    assert [str(w.message) for w in caught if "already registered" in str(w.message)] == []


# A registry that keeps weak references, and replaces an entry whose name is taken by a slotted
# marker that holds weak references to both classes, kept alive by a module-level set
# (SQLAlchemy's class registry and ``clsregistry._registries``).
WEAK_FRAMEWORK = """
import weakref

_markers = set()


class Marker:
    __slots__ = ("contents", "__weakref__")

    def __init__(self, *classes):
        self.contents = {weakref.ref(cls) for cls in classes}
        _markers.add(self)


class Registry:
    def __init__(self):
        self.classes = weakref.WeakValueDictionary()


class Base:
    registry = Registry()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        classes = Base.registry.classes
        existing = classes.get(cls.__name__)
        classes[cls.__name__] = Marker(cls, existing) if existing is not None else cls
"""


@pytest.mark.parametrize("how", ["checked", "applied"])
def test_a_weak_registry_entry_replaced_by_a_marker_is_put_back(make_module, how) -> None:
    fw = make_module(WEAK_FRAMEWORK)
    source = f"from {fw.__name__} import Base\n\nclass User(Base):\n    def hi(self):\n        return 1\n"
    mod = make_module(source)
    classes = fw.Base.registry.classes
    assert classes["User"] is mod.User
    engine = Engine()
    v2 = source.replace("return 1", "return 2")
    if how == "checked":
        engine.check(mod.__name__, source=v2)
    else:
        engine.patch(mod.__name__, source=v2)
    assert classes["User"] is mod.User
    assert fw._markers == set()
    assert mod.User().hi() == (2 if how == "applied" else 1)


NESTED = """
from collections import OrderedDict

ROUTES = OrderedDict()          # a dict subclass
BY_APP = {"shop": {}, "blog": []}  # a registry of registries


def route(path):
    def register(fn):
        ROUTES[path] = fn
        BY_APP["shop"][path] = fn
        BY_APP["blog"].append(fn)
        return fn
    return register
"""


def test_registries_in_dict_subclasses_and_nested_containers_are_undone(make_module) -> None:
    reg = make_module(NESTED)
    source = f"from {reg.__name__} import route\n\n@route('/a')\ndef a():\n    return 1\n"
    mod = make_module(source)
    before = (dict(reg.ROUTES), dict(reg.BY_APP["shop"]), list(reg.BY_APP["blog"]))
    assert before == ({"/a": mod.a}, {"/a": mod.a}, [mod.a])
    added = source + "\n@route('/b')\ndef b():\n    return 2\n"
    Engine().check(mod.__name__, source=added)
    assert (dict(reg.ROUTES), dict(reg.BY_APP["shop"]), list(reg.BY_APP["blog"])) == before


def test_re_execution_warnings_are_ignored_in_the_candidates_thread_only() -> None:
    """A framework's "already registered" warning is quiet while a candidate runs, in its own
    thread: another thread's identical warning is filtered as before (here: an error)."""
    from hotpatch.engine.registrations import quiet_re_execution

    message = "Model 'shop.note' was already registered. Reloading models is not advised"
    other: list[BaseException] = []
    ready, done = threading.Event(), threading.Event()

    def elsewhere() -> None:
        ready.wait(30)
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=1)
        except RuntimeWarning as exc:
            other.append(exc)
        done.set()

    thread = threading.Thread(target=elsewhere, daemon=True)
    thread.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filters = list(warnings.filters)
        with quiet_re_execution():
            warnings.warn(message, RuntimeWarning, stacklevel=1)  # ignored: no error
            ready.set()
            assert done.wait(30), "the other thread did not finish"
        assert list(warnings.filters) == filters
        with pytest.raises(RuntimeWarning):
            warnings.warn(message, RuntimeWarning, stacklevel=1)
    thread.join(30)
    assert len(other) == 1


def test_the_snapshot_looks_into_a_bounded_number_of_instances(make_module) -> None:
    """A class holding an object that holds thousands of objects, each with a registry-like
    dict: the snapshot stops at ``MAX_INSTANCES`` instead of copying them all."""
    from hotpatch.engine import registrations

    mod = make_module(
        "class Node:\n"
        "    def __init__(self):\n"
        "        self.table = {}\n"
        "class Hub:\n"
        "    def __init__(self, n):\n"
        "        self.__dict__.update((f'n{i}', Node()) for i in range(n))\n"
        "class Holder:\n"
        "    hubs = None\n"
        "Holder.a = Hub(900)\n"
        "Holder.b = Hub(900)\n"
        "hubs = [Hub(900) for _ in range(8)]\n"
        "class Root:\n"
        "    pass\n" + "".join(f"Root.h{i} = hubs[{i}]\n" for i in range(8))
    )
    taken = registrations.snapshot(mod)
    assert registrations.MAX_INSTANCES < 9_000  # 10 hubs of 900 nodes, each with a dict
    assert len(taken.copies) <= registrations.MAX_INSTANCES + 50
    assert len(taken.copies) > 900  # the first hubs' nodes were looked into


# A signal that builds a new list of receivers at each connect (Django's ``Signal`` does when one
# of its weakly held receivers has died), keyed and weakly held as Django keeps them.
SIGNAL = """
import weakref


class Signal:
    def __init__(self):
        self.receivers = []

    def connect(self, fn):
        self.receivers = [r for r in self.receivers if r[1]() is not None]
        self.receivers.append((id(fn), weakref.ref(fn)))
        return fn


saved = Signal()
"""


def test_a_registry_list_replaced_by_a_new_one_is_compared_all_the_same(make_module) -> None:
    sig = make_module(SIGNAL)
    source = (
        f"from {sig.__name__} import saved\n\ndef on_save():\n    return 1\n\n"
        "saved.connect(on_save)\n"
    )
    mod = make_module(source)
    before = list(sig.saved.receivers)
    assert [ref() for _, ref in before] == [mod.on_save]
    engine = Engine()
    engine.check(mod.__name__, source=source.replace("return 1", "return 2"))
    assert sig.saved.receivers == before
    engine.patch(mod.__name__, source=source.replace("return 1", "return 3"))
    assert sig.saved.receivers == before
    assert [ref()() for _, ref in sig.saved.receivers] == [3]


def test_an_exit_callback_the_candidate_registers_is_taken_back(tmp_path) -> None:
    """``atexit`` holds its callbacks where no snapshot can copy them: each check used to leave
    one more callback into the candidate's code, run when the process exits. A real process
    exits here, and prints what its exit callbacks ran."""
    module = tmp_path / "hp_exiting.py"
    module.write_text(
        'import atexit\n\ndef bye():\n    print("bye", VERSION)\n\nVERSION = 1\n'
        "atexit.register(bye)\n",
        encoding="utf-8",
    )
    script = (
        "import hotpatch, hp_exiting\n"
        "engine = hotpatch.Engine()\n"
        "source = open(hp_exiting.__file__).read()\n"
        "engine.check('hp_exiting', source=source.replace('VERSION = 1', 'VERSION = 2'))\n"
        "engine.check('hp_exiting', source=source.replace('VERSION = 1', 'VERSION = 3'))\n"
        "print('checked')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["checked", "bye 1"], done.stdout + done.stderr
