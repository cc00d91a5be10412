"""``changeset.functions_of``: the functions a class member or module value holds, found without
running its code (the planner asks it for every member of every changed class)."""

from __future__ import annotations

import functools

import pytest

from hotpatch.engine.changeset import descriptor_dict, functions_of


def f() -> int:
    return 1


def g() -> int:
    return 2


class Descriptor:
    def __init__(self, *funcs: object) -> None:
        self.funcs = funcs
        self.first = funcs[0] if funcs else None
        self.name = "x"

    def __get__(self, obj: object, owner: type | None = None) -> object:
        return self.first


class Wrapper(Descriptor):
    def __init__(self, inner: object) -> None:
        super().__init__()
        self.__wrapped__ = inner


class Plain:  # not a descriptor: what it holds is its own business
    def __init__(self) -> None:
        self.first = f


class DescriptorMeta(type):
    def __get__(cls, obj: object, owner: type | None = None) -> object:
        return cls


class ClassWithMeta(metaclass=DescriptorMeta):
    pass


class MyStaticmethod(staticmethod):
    pass


class Text(str):
    def __get__(self, obj: object, owner: type | None = None) -> object:
        return self


class Lazy:
    @functools.cached_property
    def value(self) -> int:
        return 1


CASES = [
    (f, [f]),
    (staticmethod(f), [f]),
    (classmethod(g), [g]),
    (MyStaticmethod(f), [f]),
    (property(f, g), [f, g]),
    (Lazy.__dict__["value"], [Lazy.__dict__["value"].func]),
    (Descriptor(f), [f]),  # its attributes that are functions
    (Wrapper(g), [g]),  # what it wraps, and only that
    (Wrapper(len), []),
    (Plain(), []),  # holds a function, but is no descriptor
    (ClassWithMeta, []),  # a class is never read as a descriptor's state
    (Text("a"), []),  # a str subclass that is a descriptor, with no __dict__ functions
    ("f", []),
    (None, []),
    ((f, g), []),
    ([f], []),
    (len, []),
    (functools, []),
]


@pytest.mark.parametrize(("value", "expected"), CASES)
def test_functions_of(value: object, expected: list[object]) -> None:
    assert functions_of(value) == expected


def test_a_cache_by_type_gives_the_same_answers() -> None:
    # The planner passes one cache for a whole plan: what an instance holds is decided by its
    # type once, and read from each instance.
    shapes: dict[type, int] = {}
    for _ in range(2):
        assert [functions_of(value, shapes) for value, _ in CASES] == [e for _, e in CASES]
    assert {Descriptor, Wrapper, MyStaticmethod, Plain} <= shapes.keys()


class Impostor:
    """Claims to be a property (``isinstance`` believes its ``__class__``; ``type`` does not)."""

    __class__ = property  # type: ignore[assignment]

    @property
    def fget(self) -> object:
        raise AssertionError("read as a property: its code ran")


def test_an_object_that_claims_another_class_is_read_by_its_type() -> None:
    assert isinstance(Impostor(), property)
    assert functions_of(Impostor()) == [] and functions_of(Impostor(), {}) == []


def test_descriptor_dict_reads_the_state_of_descriptors_only() -> None:
    assert descriptor_dict(Descriptor(f)) == {"funcs": (f,), "first": f, "name": "x"}
    assert descriptor_dict(Plain()) is None
    assert descriptor_dict(ClassWithMeta) is None
    assert descriptor_dict(3) is None
    assert descriptor_dict(Text("a")) == {}
