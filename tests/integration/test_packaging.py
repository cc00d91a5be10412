"""The built distributions carry what the package needs: every subpackage, py.typed, the license."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import hotpatch

REPO = Path(hotpatch.__file__).resolve().parents[1]


def test_wheel_and_sdist_carry_the_license_and_every_subpackage(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "License-Expression: MIT" in meta
    assert "License-File: LICENSE" in meta
    packages = {
        p.parent.relative_to(REPO).as_posix() for p in (REPO / "hotpatch").rglob("__init__.py")
    }
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} missing from the wheel"
    assert "hotpatch/py.typed" in names
    with tarfile.open(sdist) as tf:
        assert any(m.name.endswith("/LICENSE") for m in tf.getmembers())
