"""In-process patches of SQLAlchemy declarative models (issue 12).

Re-executing a module of declarative classes declares each class a second time on the live
``Base``: SQLAlchemy warns ("This declarative base already contains a class with the same class
name and module name"), puts a marker of both classes in the base's class registry, and then
refuses the table ("Table 'users' is already defined for this MetaData instance"). The patch is
refused at ``execute`` with SQLAlchemy's reason, without the warning, and the class registry holds
the live class again, as before the patch.
"""

from __future__ import annotations

import sys
import warnings

import pytest

from hotpatch import Engine, PatchRejected

pytest.importorskip("sqlalchemy", reason="sqlalchemy is not installed (the test extra installs it)")

BASE = """
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass
"""

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from {db} import Base


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(30))

    def greet(self):
        return "hi " + self.name
"""


@pytest.mark.parametrize("how", ["patched", "checked"])
def test_a_declarative_models_module_is_refused_and_leaves_the_registry(make_module, how) -> None:
    from sqlalchemy.orm import configure_mappers

    db = make_module(BASE)
    source = MODELS.format(db=db.__name__)
    models = make_module(source)
    configure_mappers()
    registry = db.Base.registry._class_registry
    before = dict(registry)
    assert before["User"] is models.User
    table = models.User.__table__
    columns = list(table.columns)
    engine = Engine()
    new = source.replace('"hi "', '"hello "')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = engine.check if how == "checked" else engine.patch
        with pytest.raises(PatchRejected) as info:
            run(models.__name__, source=new)
    assert info.value.stage == "execute"
    assert "Table 'users' is already defined" in info.value.reason
    assert dict(registry) == before
    assert registry["User"] is models.User
    assert [str(w.message) for w in caught] == []
    assert db.Base.metadata.tables["users"] is table and list(table.columns) == columns
    assert models.User(name="x").greet() == "hi x"
    assert sys.modules[models.__name__] is models
