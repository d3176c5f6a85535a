"""Fixtures shared by the test files: the tiny random checkpoint most tests run on, and a float32 engine on it.
Converted weights (cpu/wcache.py) go to a temporary folder of this run, never to the user's cache, also in the
processes tests start."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["LFM2VL_WEIGHT_CACHE"] = tempfile.mkdtemp(prefix="lfm2vl-weight-cache-")
atexit.register(shutil.rmtree, os.environ["LFM2VL_WEIGHT_CACHE"], ignore_errors=True)

from checkpoints import cached_checkpoint


@pytest.fixture
def isa_cap(request):
    """Cap the native kernels' instruction set at request.param (parametrize indirectly) for one test, so the AVX2
    and scalar fallbacks run on an AVX512 CPU too; the cap is lifted afterwards."""
    from lfm2vl.cpu import kernels

    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(3)


@pytest.fixture
def amx_on(request):
    """Run the AMX paths (int8 and bf16 products, attention; True: where the CPU has the tiles) or not (False) for
    one test (parametrize indirectly), so both paths run on an AMX CPU; the tiles are turned back on afterwards."""
    from lfm2vl.cpu import kernels

    if kernels.available():
        kernels.set_amx(request.param)
    yield request.param
    if kernels.available():
        kernels.set_amx(True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of the "tiny-lfm2vl" random checkpoint, built once per session. Read-only: a test that edits files
    copies the folder first."""
    return cached_checkpoint(tmp_path_factory, "tiny-lfm2vl")[0]


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    """A float32 engine on tiny_checkpoint, one per test file: tests in a file may reset or patch it, other files
    never see that."""
    from lfm2vl.engine import load

    return load(tiny_checkpoint, dtype="float32")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models on shared cores run fastest on one)."""
    from finetune_util import one_thread

    with one_thread():
        yield


@pytest.fixture
def umask_022():
    """The process umask set to 022 for the test (the common default), whatever the shell's; restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# An output path no process can create a file under, even as root: its parent is a regular file.
@pytest.fixture
def unwritable(tmp_path):
    """A path under a regular file (tmp_path/file/x): every write there fails, whoever runs the tests."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "x"
