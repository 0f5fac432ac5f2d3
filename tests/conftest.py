import os

import pytest
import torch

import flora
from _train_helpers import tiny_checkpoint
from flora import _ext
from flora.data import load_tokenizer


def pytest_report_header(config):
    return f"flora {flora.__version__} from {os.path.dirname(flora.__file__)}; extension: " + (
        "compiled" if _ext.C is not None else f"missing ({_ext.ERROR})"
    )


def pytest_configure(config):
    # CI sets this so a test run that imports a flora without its compiled
    # extension (e.g. the source tree instead of the install) fails loudly
    # instead of skipping every kernel test.
    if os.environ.get("FLORA_REQUIRE_EXTENSION") == "1" and _ext.C is None:
        raise pytest.UsageError(
            f"FLORA_REQUIRE_EXTENSION=1 but {flora.__file__} has no compiled extension: {_ext.ERROR}"
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on machines without a CUDA device; tests marked
    `extension` (they check how the compiled ops run, not what they compute) without
    the extension (FLORA_NO_EXTENSION=1: the pure-PyTorch references)."""
    skips = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA device")
    if _ext.C is None:
        skips["extension"] = pytest.mark.skip(reason=f"checks the compiled extension: {_ext.ERROR}")
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def gemv_max_m():
    """flora._C.set_cpu_gemv_max_m: the CPU decode kernels' largest M for every
    dtype, whatever this machine's rule; the rule back after the test."""
    from flora import _ext

    if _ext.C is None:  # the reference ops: no decode kernels to steer
        yield lambda m: None
        return
    yield _ext.C.set_cpu_gemv_max_m
    _ext.C.set_cpu_gemv_max_m(-1)


@pytest.fixture(scope="session")
def gguf_path():
    """SmolLM2-135M-Instruct's GGUF file (fetched once into ~/.cache/flora): skipped
    where it cannot be had, unless FLORA_REQUIRE_REAL_MODEL=1 (CI) makes that a failure."""
    from flora.pretrained import smollm2_path

    try:
        return smollm2_path()
    except (RuntimeError, OSError) as e:
        if os.environ.get("FLORA_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"SmolLM2-135M not available: {e}")


# The tiny trained-from-scratch checkpoint and its tokenizer, shared by the
# training tests (a module that needs another checkpoint defines its own).
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)
