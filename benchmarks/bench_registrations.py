"""What the engine's registration snapshot costs per candidate, on modules of several kinds.

Every candidate (each check and patch) first copies the live containers the module can reach
(``hotpatch.engine.registrations.snapshot``), and compares them with the copies after it ran
(``Snapshot.collect``). This times the two (nothing changed in between), in one process, on: the
generated 300- and 3,000-line modules of ``bench_engine.py``; a Django models module (two models,
a foreign key, Django set up); a Flask app with a blueprint; a FastAPI app with a Pydantic model;
a SQLAlchemy declarative module; six and cachetools from the replay's sdists. With ``--baseline
FILE`` (another version of ``registrations.py``, e.g. ``git show REV:hotpatch/engine/
registrations.py > /tmp/old.py``) both are timed, interleaved, and the medians compared.

    .venv/bin/python benchmarks/bench_registrations.py [--baseline /tmp/old.py] [--repeats 200]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import tarfile
import tempfile
import textwrap
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_engine  # noqa: E402  (the generated modules of the engine benchmark)

from hotpatch.engine import registrations  # noqa: E402

FILES = {
    "bench_app/__init__.py": "",
    "bench_app/models.py": """
        from django.db import models


        class Author(models.Model):
            name = models.CharField(max_length=10)


        class Note(models.Model):
            text = models.CharField(max_length=100)
            author = models.ForeignKey(Author, on_delete=models.CASCADE)

            def __str__(self):
                return self.text
    """,
    "bench_flask.py": """
        from flask import Blueprint, Flask

        app = Flask(__name__)
        bp = Blueprint("b", __name__)


        @bp.route("/x")
        def x():
            return "x"


        @app.route("/")
        def index():
            return "i"


        app.register_blueprint(bp)
    """,
    "bench_fastapi.py": """
        from fastapi import FastAPI
        from pydantic import BaseModel

        app = FastAPI()


        class Item(BaseModel):
            name: str


        @app.get("/")
        def index() -> Item:
            return Item(name="x")
    """,
    "bench_sa_db.py": """
        from sqlalchemy.orm import DeclarativeBase


        class Base(DeclarativeBase):
            pass
    """,
    "bench_sa.py": """
        from sqlalchemy import String
        from sqlalchemy.orm import Mapped, mapped_column

        from bench_sa_db import Base


        class User(Base):
            __tablename__ = "users"
            id: Mapped[int] = mapped_column(primary_key=True)
            name: Mapped[str] = mapped_column(String(30))
    """,
}


def load_baseline(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_registrations", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prepare(root: Path) -> list[str]:
    """Write and import the modules; returns the names of those that could be imported."""
    for relative, text in FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    for lines in (300, 3000):
        (root / f"bench_gen{lines}.py").write_text(bench_engine.generate_module(lines))
    sys.path.insert(0, str(root))
    for sdist, inner in (("six-1.16.0", ""), ("cachetools-8.0.0", "src")):
        archive = HERE / "replay_data" / f"{sdist}.tar.gz"
        if archive.exists():
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
            sys.path.insert(0, str(root / sdist / inner))
    names = ["bench_gen300", "bench_gen3000"]
    try:
        from django.conf import settings

        settings.configure(
            INSTALLED_APPS=["bench_app"],
            DATABASES={},
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
        import django

        django.setup()
        names.append("bench_app.models")
    except ImportError:
        pass
    for name in ("bench_flask", "bench_fastapi", "bench_sa", "six", "cachetools"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        names.append(name)
    for name in names:
        importlib.import_module(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another registrations.py to compare with")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    impls: dict[str, types.ModuleType] = {"current": registrations}
    if args.baseline:
        impls = {"baseline": load_baseline(args.baseline), **impls}
    with tempfile.TemporaryDirectory() as tmp:
        names = prepare(Path(tmp))
        header = f"{'module':18}"
        for label in impls:
            header += f" {label + ' ms':>12} {label + ' copies':>16}"
        print(header)
        for name in names:
            module = sys.modules[name]
            times: dict[str, list[float]] = {label: [] for label in impls}
            copies: dict[str, int] = {}
            for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
                for label, impl in impls.items():
                    started = time.perf_counter()
                    taken = impl.snapshot(module)
                    taken.collect({})
                    times[label].append(time.perf_counter() - started)
                    copies[label] = len(taken.copies)
            row = f"{name:18}"
            for label in impls:
                row += f" {statistics.median(times[label]) * 1000:12.3f} {copies[label]:16}"
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
