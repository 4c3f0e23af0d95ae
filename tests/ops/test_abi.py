"""The kernel constants: defined once in promptkit.abi, mirrored by the C++ headers, used by the Triton kernels.

``promptkit._C.abi()`` exports the values the C++ and CUDA kernels are compiled with (csrc/common/defs.h names
the headers); a difference is a kernel that reads a code the Python side did not mean.
"""

import subprocess
import sys

from promptkit import _C, abi


def test_cpp_headers_mirror_the_python_constants():
    assert _C.abi() == abi.constants()


def test_constants_are_distinct_codes():
    kinds = [abi.XENT_INDEX, abi.XENT_UNIFORM, abi.XENT_DENSE, abi.XENT_MULTILABEL]
    assert sorted(kinds) == list(range(len(kinds)))
    assert sorted(abi.ORTHO_MODES.values()) == [abi.ORTHO_ABS_SUM, abi.ORTHO_MEAN_COS] == [0, 1]
    assert sorted(abi.DTYPE_CODES.values()) == list(range(len(abi.DTYPE_CODES)))


def test_triton_kernels_export_the_abi_constants():
    from promptkit import kernels

    for name in ("XENT_INDEX", "XENT_UNIFORM", "XENT_DENSE", "XENT_MULTILABEL", "ORTHO_ABS_SUM", "ORTHO_MEAN_COS",
                 "MIX_EPS"):
        assert getattr(kernels, name) == getattr(abi, name), name


def test_abi_imports_nothing():
    """The kernels import it, so it must not import the ops layer above them (tests/test_imports.py checks the
    whole import graph for cycles)."""
    code = ("import sys; import promptkit.abi; "
            "print(*(name in sys.modules for name in ('torch', 'triton', 'promptkit.ops', 'promptkit.kernels')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False"] * 4
