"""The wheel a user installs (`pip install .`) holds what the code reads at run time: GSM8K's files for `mtp eval`
and `mtp train --data gsm8k`, the license, the `mtp` command."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build requirement (an SPDX license string)
        pytest.skip(f"setuptools {setuptools.__version__} here; the build wants >= 77 (pip fetches it when isolated)")
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the environment's setuptools (nothing downloaded); the build tree goes to the temp folder
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "--quiet", "--wheel-dir", str(out)], capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("mtp-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_the_data_the_code_reads(wheel):
    names = set(wheel.namelist())
    for split in ("train", "test"):
        source = ROOT / "src" / "mtp" / "data" / "gsm8k" / f"{split}.jsonl"
        assert wheel.read(f"mtp/data/gsm8k/{split}.jsonl") == source.read_bytes()
    assert "mtp/py.typed" in names
    packages = {p.relative_to(ROOT / "src").parent.as_posix() for p in (ROOT / "src" / "mtp").rglob("*.py")}
    assert packages <= {Path(n).parent.as_posix() for n in names}  # every subpackage, none left out


def test_the_wheel_declares_its_license_and_command(wheel):
    info = {Path(n).name: n for n in wheel.namelist() if ".dist-info/" in n}
    metadata = wheel.read(info["METADATA"]).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert wheel.read(info["LICENSE"]) == (ROOT / "LICENSE").read_bytes()
    assert "mtp = mtp.cli:main" in wheel.read(info["entry_points.txt"]).decode()


def test_the_source_distribution_holds_the_suite_and_the_docs(tmp_path):
    """The sdist is a checkout a user can test: every test file and its helpers (without conftest.py none
    collects), the docs the README links to, the Makefile; no caches."""
    import tarfile

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build wants >= 77")
    done = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; "
                           f"build_meta.build_sdist({str(tmp_path)!r})"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("mtp-*.tar.gz")
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "tests", "docs"], capture_output=True, text=True, cwd=ROOT)
    expected = set(tracked.stdout.split()) if tracked.returncode == 0 and tracked.stdout else \
        {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
    assert expected <= names, sorted(expected - names)[:5]
    assert {"Makefile", "README.md", "LICENSE", "src/mtp/data/gsm8k/test.jsonl"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
