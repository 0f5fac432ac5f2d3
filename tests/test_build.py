"""Build options of setup.py (issue 2)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from setup_rules import setup_functions as _setup_functions  # noqa: E402  (setup.py's functions)


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_forcing_cuda_without_cuda_torch_is_a_clear_error():
    env = dict(os.environ, FLORA_CUDA="1")
    p = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode != 0
    assert "FLORA_CUDA=1" in p.stderr and "no CUDA" in p.stderr


def test_version_matches_package():
    import flora

    p = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=dict(os.environ, FLORA_CUDA="0"),
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == flora.__version__


def _fake_toolkit(tmp_path, cudart=True):
    """A toolkit at tmp/cuda-x and, outside it, tmp/wrap/bin/nvcc: a wrapper
    script that execs the toolkit's nvcc (as /usr/local/bin/nvcc does here)."""
    kit = tmp_path / "cuda-x"
    (kit / "bin").mkdir(parents=True)
    (kit / "lib64").mkdir()
    if cudart:
        (kit / "lib64" / "libcudart.so").write_text("")
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={kit}/bin/.." >&2\n')
    wrap = tmp_path / "wrap" / "bin"
    wrap.mkdir(parents=True)
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for f in (nvcc, wrap / "nvcc"):
        f.chmod(0o755)
    return kit, wrap.parent


@pytest.mark.parametrize("cudart", [True, False])
def test_cuda_home_follows_a_wrapper_nvcc_to_its_toolkit(tmp_path, monkeypatch, cudart):
    import types

    kit, wrap = _fake_toolkit(tmp_path, cudart=cudart)
    ext = types.SimpleNamespace(CUDA_HOME=str(wrap))
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"))
    f = _setup_functions("has_cudart", "resolve_cuda_home", cpp_extension=ext, torch=fake_torch)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.setenv(var, "")  # recorded, so what the run sets is undone
        monkeypatch.delenv(var)
    f.resolve_cuda_home()
    # torch's guess (the wrapper's grandparent) has no libcudart; the toolkit does
    assert ext.CUDA_HOME == (os.path.realpath(kit) if cudart else str(wrap))
    if cudart:
        assert os.environ["CUDA_HOME"] == os.path.realpath(kit)


def test_cuda_home_set_by_the_user_is_kept(tmp_path, monkeypatch):
    import types

    kit, wrap = _fake_toolkit(tmp_path)
    ext = types.SimpleNamespace(CUDA_HOME=str(wrap))
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"))
    f = _setup_functions("has_cudart", "resolve_cuda_home", cpp_extension=ext, torch=fake_torch)
    monkeypatch.setenv("CUDA_HOME", str(wrap))
    f.resolve_cuda_home()
    assert ext.CUDA_HOME == str(wrap)


def test_editable_install_reuses_the_plain_install_objects():
    # setuptools gives `pip install -e .` a fresh temporary object folder; BuildExt
    # points it at the folder of `pip install .`, which must be setuptools' own.
    import sysconfig

    from setuptools import Distribution

    f = _setup_functions("plain_build_temp", sys=sys, sysconfig=sysconfig)
    build = Distribution({"name": "x"}).get_command_obj("build")
    build.build_base = os.path.join(ROOT, "build")  # paths only: nothing is created
    build.ensure_finalized()
    assert f.plain_build_temp() == build.build_temp
