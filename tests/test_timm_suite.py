"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) pass on our names.

The test file is taken, unmodified, from the source distribution of the installed timm version on
the package registry (``pip download --no-binary :all: timm==VERSION``) and kept in
``~/.cache/histotoken/timm-tests/VERSION/`` (``$XDG_CACHE_HOME`` is respected;
``$HISTOTOKEN_TIMM_TESTS_DIR`` overrides the folder), so it is downloaded once per version. It runs
in a subprocess with ``tests/timm_suite/timm_conftest.py`` as its conftest, which registers our
families and narrows timm's ``list_models`` to our names with timm's own patterns applied (read
its docstring for the two rules that put our token models where timm puts its ViTs). ``-k`` then
selects the cases parametrized with our names, leaving out timm's tests of named timm models.

To stay quick, the ``*_small`` variants are left out: they are the same classes as the tiny ones at
larger sizes (``HISTOTOKEN_TIMM_SUITE_ALL=1`` includes them; about 5.5 minutes instead of about 2.5
on one core of a shared machine). Marked ``timm_suite``; skipped, with the reason, when the
package registry cannot be reached and no copy is cached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm

import histotoken  # noqa: F401  (registers our families)

CONFTEST = Path(__file__).parent / "timm_suite" / "timm_conftest.py"
DOWNLOAD_TIMEOUT_S = 180
RUN_TIMEOUT_S = 1800

pytestmark = pytest.mark.timm_suite


def _cache_dir(version: str) -> Path:
    override = os.environ.get("HISTOTOKEN_TIMM_TESTS_DIR")
    if override:
        return Path(override) / version
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "histotoken" / "timm-tests" / version


def timm_test_file(version: str) -> Path:
    """``tests/test_models.py`` of timm ``version``'s sdist, downloaded once into the cache folder."""
    target = _cache_dir(version) / "test_models.py"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="timm-sdist-") as download:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"timm=={version}", "-d", download, "--quiet", "--disable-pip-version-check",
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.skip(f"the package registry did not deliver timm {version}'s sdist in {DOWNLOAD_TIMEOUT_S} s")
        archives = list(Path(download).glob("timm-*.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive"]
            pytest.skip(f"cannot download timm {version}'s sdist from the package registry: {reason[0]}")
        with tarfile.open(archives[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                pytest.fail(f"timm {version}'s sdist has no tests/test_models.py")
            source = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(source)
    partial.replace(target)  # atomic: a concurrent run never reads half a file
    return target


def our_names(include_small: bool) -> list[str]:
    names = sorted(
        name for name in timm.list_models()
        if getattr(timm.models.model_entrypoint(name), "__module__", "").startswith("histotoken.")
    )
    return [name for name in names if include_small or "_small" not in name]


def test_timm_model_tests_pass_on_our_names(tmp_path):
    test_file = timm_test_file(timm.__version__)
    names = our_names(include_small=os.environ.get("HISTOTOKEN_TIMM_SUITE_ALL") == "1")
    shutil.copy(test_file, tmp_path / "test_models.py")
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: none of our pytest options
    env = dict(os.environ, HISTOTOKEN_TIMM_NAMES=",".join(names))
    command = [
        sys.executable, "-m", "pytest", "test_models.py", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
        "-rfE", "-k", " or ".join(names),
    ]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"timm's tests did not finish in {RUN_TIMEOUT_S} s:\n{(error.stdout or '')[-3000:]}")
    output = result.stdout + result.stderr
    summary = re.search(r"(\d+) passed", output)
    assert result.returncode == 0, f"timm's tests failed on our names:\n{output[-6000:]}"
    # every name takes at least timm's 7 forward/backward/config/TorchScript/FX tests
    assert summary and int(summary.group(1)) >= 7 * len(names), f"too few of timm's tests ran:\n{output[-3000:]}"
