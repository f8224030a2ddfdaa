"""The locks in requirements/ agree with pyproject.toml, and every installer uses them. Runs in
`make test` (and so in CI): a pin edited without `make lock` fails here."""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_lock_module():
    # A script, not a package; registered under its name as dataclasses expect.
    spec = importlib.util.spec_from_file_location("requirements_lock", ROOT / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lock = load_lock_module()


def test_the_locks_agree_with_pyproject():
    found = lock.problems(ROOT)
    assert not found, "\n".join(found)


@pytest.fixture
def copy(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return tmp_path


def test_a_pin_changed_without_relocking_is_caught(copy):
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"fastapi==0.165.0"', '"fastapi==0.164.0"'))
    found = lock.problems(copy)
    assert any("cpu.txt holds fastapi==0.165.0, pyproject.toml pins 0.164.0" in p for p in found), found
    assert any("cuda.txt" in p and "run `make lock`" in p for p in found), found


def test_a_new_dependency_or_extra_change_is_caught(copy):
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest==', '"pytest-randomly==4.0.1",\n    "pytest=='))
    found = lock.problems(copy)
    assert any("cpu.txt lacks pytest-randomly" in p for p in found), found
    # The digest names every lock as stale, even those the new test pin does not reach.
    assert any(p.startswith("requirements/device-site.txt was locked from other inputs") for p in found), found


def test_a_device_bundle_pin_that_strays_from_pyproject_is_caught(copy):
    site = copy / "requirements" / "device-site.txt"
    site.write_text(site.read_text().replace("pydantic==2.14.4", "pydantic==2.14.3"))
    assert any("device-site.txt holds pydantic==2.14.3" in p for p in lock.problems(copy))


def test_an_entry_without_a_hash_is_caught(copy):
    cpu = copy / "requirements" / "cpu.txt"
    cpu.write_text(re.sub(r"(?m)^(rich==\S+) \\\n(    --hash=\S+ \\\n)*    --hash=\S+\n", r"\1\n", cpu.read_text()))
    assert any("cpu.txt: rich==" in p and "no hash" in p for p in lock.problems(copy))


def test_every_installer_installs_from_its_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile and "LOCK := requirements/cpu.txt" in makefile
    assert "--require-hashes --no-deps -r /tmp/requirements/cuda.txt" in (ROOT / "Dockerfile").read_text()
    for script, name in (("device_site.sh", "device-site.txt"), ("device_svc.sh", "device-svc.txt")):
        text = (ROOT / "bench" / script).read_text()
        assert f"LOCK=requirements/{name}" in text and "--require-hashes" in text, script


def test_the_cuda_image_holds_the_fast_paths_kernels_at_the_benchs_version():
    """A GPU worker built from the Dockerfile runs the fast path the published figures were measured
    with: liger's kernels (trainer.fastpath.apply_liger skips them silently when absent), at the
    version the lent GPU's bundle carries."""
    cuda = lock.read_lock(ROOT / "requirements" / "cuda.txt")
    bench = lock.read_lock(ROOT / "requirements" / "device-site.txt")
    assert cuda.get("liger-kernel") == bench.get("liger-kernel") and cuda["liger-kernel"][1], (
        cuda.get("liger-kernel"), bench.get("liger-kernel"))


def test_the_installed_packages_and_the_image_carry_their_bytecode():
    """Where PYTHONDONTWRITEBYTECODE is set (these machines, the image's runtime) no process
    writes .pyc files: an install without them makes every process compile torch and transformers
    again, which doubled their import and the suite's time."""
    import torch
    import transformers

    for module in (torch, transformers):
        assert Path(importlib.util.cache_from_source(module.__file__)).is_file(), f"{module.__name__} has no bytecode"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "compileall -q api core worker trainer tuneq migrations" in dockerfile
