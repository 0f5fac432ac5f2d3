"""Build options of setup.py (issue 2)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
