"""The GPU kernels compile for the GPUs we target, fit them, and launch within CUDA's limits: proven without a GPU.

Triton: each kernel of ``promptkit.kernels`` is compiled ahead of time by Triton's own compiler for sm_80 (A100)
and sm_90 (H100/H200), with the very ``Launch`` (tile sizes, warps, options) that its host function computes for a
representative problem (``_triton_aot.VARIANTS``): every dtype (fp32, fp32 with TF32, fp16, bf16, fp64), every
constexpr branch (xent kind, ortho mode), one-tile and tiled K up to 256, feature sizes that are and are not
multiples of 16. The CUDA module: every kernel of the built ``promptkit._C``, for each architecture it holds.

Each compiled kernel must fit one block on its target:

- shared memory (static + dynamic) at most the target's per-block opt-in limit, ``SHARED_LIMIT``;
- registers: at most 255 a thread, and registers x threads a block at most the 65,536 of the register file;
- spills: no local memory, and a stack frame (where ptxas spills registers) of at most ``STACK_BOUND`` bytes a
  thread (today the CUDA kernels' worst is 16 B, the Triton kernels' 8 B);
- where the forward/backward identity needs z = scale * cos rounded on its own (xent, segment_stats), no
  contracted multiply-add (``fma.rn.f32``) in the PTX of the half-precision variants, whose dot runs on tensor
  cores (the CUDA side uses csrc/common/defs.h's mul_rn); a control compile with contraction on shows the check
  can fail.

The figures come from ``cuobjdump --dump-resource-usage`` and ``-elf`` (shipped in the triton wheel). Triton caches
what it compiles under the temp dir, so a rerun takes 15-25 s; a cold run 1.5 minutes on two busy cores. The launch
grids are checked apart, without compiling, for problem sizes up to 100 M.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import triton

from promptkit import _C
from promptkit.kernels import _common  # the package imports every kernel module (sys.modules below)

from ._triton_aot import VARIANTS, cuobjdump, resource_usage

# Largest shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100/H200.
SHARED_LIMIT = {80: 166_912, 90: 232_448}
STATIC_SHARED_LIMIT = 49_152  # static __shared__ arrays, on every architecture
MAX_REGISTERS_PER_THREAD = 255
REGISTER_FILE = 65_536  # 32-bit registers one block may use on sm_80 and sm_90
STACK_BOUND = 32  # bytes of stack frame (spilled registers) a thread may use
TARGETS = [80, 90]
WORKER = Path(__file__).with_name("_triton_aot.py")
MODULES = ("cosine", "softmax_stats", "xent", "rowops", "ortho")  # the modules of promptkit.kernels with kernels

needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None,
                                     reason="no cuobjdump (neither in the triton wheel nor the CUDA toolkit)")


def check_fits(name: str, arch: int, res: dict[str, int], threads: int, dynamic_shared: int = 0) -> None:
    """Assert that one block of ``threads`` threads of this kernel fits an sm_``arch`` GPU (see the module doc)."""
    shared = res["shared"] + dynamic_shared
    assert shared <= SHARED_LIMIT[arch], f"{name}: {shared} B shared memory > sm_{arch}'s {SHARED_LIMIT[arch]} B"
    assert res["registers"] <= MAX_REGISTERS_PER_THREAD, f"{name}: {res['registers']} registers a thread"
    assert res["registers"] * threads <= REGISTER_FILE, \
        f"{name}: {res['registers']} registers x {threads} threads > {REGISTER_FILE}"
    assert res["local"] == 0, f"{name}: {res['local']} B of local memory"
    assert res["stack"] <= STACK_BOUND, f"{name}: {res['stack']} B stack frame (spills) > {STACK_BOUND} B a thread"


# ---------------------------------------------------------------- the Triton kernels

FUSED_CONTROL = next(v.id for v in VARIANTS.values() if v.kernel == "_xent_bwd_kernel" and v.no_fma) + "@90@fused"


def _jobs(session: pytest.Session) -> list[str]:
    """The compile jobs of the tests selected in this module (``-k`` compiles only what it runs)."""
    jobs = []
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.path == Path(__file__) and "variant_id" in params:
            jobs.append(f"{params['variant_id']}@{params['arch']}")
        elif item.path == Path(__file__) and item.name == "test_fma_check_would_see_a_fused_multiply_add":
            jobs += [FUSED_CONTROL.removesuffix("@fused"), FUSED_CONTROL]
    return list(dict.fromkeys(jobs))


@pytest.fixture(scope="module")
def compiled(request) -> dict[str, dict]:
    """{job: record} for every selected job, compiled by _triton_aot.py in worker processes (one per core, at
    most two) started without TRITON_INTERPRET; Triton's compile cache lives in the temp dir between runs."""
    jobs = _jobs(request.session)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"promptkit-triton-aot-{triton.__version__}")
    workers = max(1, min(2, os.cpu_count() or 1, len(jobs)))
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / f"worker{i}.json" for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(out), *jobs[i::workers]], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i, out in enumerate(outs)]
        for proc, out in zip(procs, outs):
            log, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"the compile worker failed:\n{log[-4000:]}"
            records.update((r["job"], r) for r in json.loads(out.read_text()))
    return records


def _record(compiled: dict[str, dict], job: str) -> dict:
    record = compiled[job]
    assert "error" not in record, f"{job} does not compile: {record.get('error')}"
    return record


@needs_cuobjdump
@pytest.mark.parametrize("arch", TARGETS, ids=[f"sm_{a}" for a in TARGETS])
@pytest.mark.parametrize("variant_id", list(VARIANTS))
def test_triton_kernel_compiles_and_fits(compiled, variant_id, arch):
    record = _record(compiled, f"{variant_id}@{arch}")
    check_fits(f"{variant_id} on sm_{arch}", arch, record, record["threads"], record["dynamic_shared"])
    if VARIANTS[variant_id].no_fma:
        assert record["fma"] == 0, f"{variant_id}: {record['fma']} fused multiply-adds in the PTX"


@needs_cuobjdump
def test_fma_check_would_see_a_fused_multiply_add(compiled):
    """The no-FMA assertion can fail: with contraction forced on, the very same kernel holds FMAs."""
    assert _record(compiled, FUSED_CONTROL.removesuffix("@fused"))["fma"] == 0
    assert _record(compiled, FUSED_CONTROL)["fma"] > 0


def test_every_triton_kernel_is_covered():
    kernels = set()
    for module in MODULES:
        namespace = vars(sys.modules[f"promptkit.kernels.{module}"])
        kernels |= {(module, name) for name, value in namespace.items()
                    if name.endswith("_kernel") and isinstance(value, triton.runtime.KernelInterface)}
    assert kernels == {(v.module, v.kernel) for v in VARIANTS.values()}


# ---------------------------------------------------------------- launch grids

BIG = 100_000_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_launch_grids_stay_within_cuda_limits(dtype, monkeypatch):
    """Problem sizes up to 100 M on every launch dimension that grows with one: the grid fits CUDA's limits."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tile sizes of a GPU launch
    mods = {m: sys.modules[f"promptkit.kernels.{m}"] for m in MODULES}
    plans = []
    for B, N in [(1, BIG), (4096, BIG), (BIG, 1), (BIG, 1000), (65536 * 64 + 1, 2)]:
        plans += [mods["cosine"].cosine_launch(B, N, 512, dtype), mods["xent"].xent_launch(B, N, 512, dtype, 0, True),
                  mods["xent"].xent_launch(B, N, 512, dtype, 0, False)]
    for B, widest, S in [(BIG, 1000, 1), (4096, 10, 100_000), (1, 1, BIG), (BIG, 1, 3)]:
        plans.append(mods["softmax_stats"].segment_stats_launch(B, widest, 512, S, dtype))
    for R, D in [(BIG, 1), (BIG, 512), (BIG, 4096), (10, 2**20)]:
        plans.append(mods["rowops"].rows_launch(R, D))
    for C, K in [(BIG, 3), (1_000_000, 256), (1, BIG)]:
        plans.append(mods["ortho"].ortho_launch(C, K, 512, dtype, 0))
    for plan in plans:
        assert 1 <= len(plan.grid) <= 3
        assert all(1 <= g <= limit for g, limit in zip(plan.grid, _common.MAX_GRID)), plan
        _common.check_grid("test", plan.grid)


def test_check_grid_rejects_what_cuda_would_refuse():
    for grid in [(2**31,), (1, 65536), (1, 1, 65536), (0,)]:
        with pytest.raises(ValueError, match="exceeds CUDA's limits"):
            _common.check_grid("cosine", grid)


# ---------------------------------------------------------------- the CUDA module


def _launch_bounds(binary: Path) -> dict[str, int]:
    """Each kernel's __launch_bounds__ (threads a block), from the .nv.info sections of its ELF."""
    text = subprocess.run([cuobjdump(), "-elf", str(binary)], capture_output=True, text=True, check=True).stdout
    bounds: dict[str, int] = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", text):
        head = re.match(r"\.nv\.info\.(\S+)", section)
        value = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)",
                          section)
        if head and value:
            x, y, z = (int(v, 16) for v in value.groups())
            bounds[head.group(1)] = x * y * z
    return bounds


def test_cuda_module_kernels_fit():
    """Every kernel of promptkit._C, for each architecture it was built for, fits one block of its launch bounds."""
    info = _C.build_info()
    if not info["cuda"]:
        message = f"promptkit._C was built without CUDA ({info['why_no_cuda']})"
        if os.environ.get("PROMPTKIT_EXPECT_CUDA_BUILD") == "1":
            pytest.fail(message + ", but PROMPTKIT_EXPECT_CUDA_BUILD=1")
        pytest.skip(message)
    if cuobjdump() is None:
        pytest.fail("promptkit._C holds CUDA kernels but no cuobjdump was found to inspect them")
    binary = Path(_C.__file__)
    usage = resource_usage(binary)
    built = {f"sm_{arch.split('-')[0]}" for arch in info["cuda_archs"].split(",")}
    assert built <= set(usage), f"device code for {sorted(built - set(usage))} is missing from {binary.name}"
    bounds = _launch_bounds(binary)
    for arch, kernels in usage.items():
        assert kernels, f"no kernels for {arch}"
        number = int(re.sub(r"\D", "", arch))
        for name, res in kernels.items():
            assert name in bounds, f"{name} has no __launch_bounds__: its register budget is unchecked"
            assert res["shared"] <= STATIC_SHARED_LIMIT, f"{name} on {arch}: {res['shared']} B static shared memory"
            if number in SHARED_LIMIT:
                check_fits(f"{name} on {arch}", number, res, bounds[name])
