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
  thread (today the CUDA kernels' worst is 8 B, the Triton kernels' 8 B);
- where the forward/backward identity needs z = scale * cos rounded on its own (xent, segment_stats), no
  contracted multiply-add (``fma.rn.f32``) in the PTX of the half-precision variants, whose dot runs on tensor
  cores (the CUDA side uses csrc/common/defs.h's mul_rn); a control compile with contraction on shows the check
  can fail.

The CUDA module's tile products (csrc/cuda/product.cuh) must run on tensor cores: the SASS (``cuobjdump -sass``)
of every fp16, bf16 and TF32 product kernel holds HMMA of its type, the exact fp32 and fp64 ones FFMA / DFMA and
no HMMA, and two blocks of each fit an SM (the column-chunk plan of csrc/cuda/softmax.cu counts on it). The TF32
switch those kernels read from torch (csrc/cuda/tf32.h, plain C++) is compiled alone and checked against torch's
settings, and the split-and-merge order of the CUDA reductions (lanes, 64-column tiles, column chunks, with the
csrc/common functions the kernels call) is run on the host against the CPU backend, special values included.

The figures come from ``cuobjdump --dump-resource-usage`` and ``-elf`` (shipped in the triton wheel). Triton caches
what it compiles under the temp dir, so a rerun takes 15-25 s; a cold run 1.5 minutes on two busy cores. The launch
grids are checked apart, without compiling, for problem sizes up to 100 M.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def _cuda_binary() -> Path:
    """The built promptkit._C, which holds CUDA kernels: skips when it was built without CUDA (a failure where
    PROMPTKIT_EXPECT_CUDA_BUILD=1, as in CI), fails when there is no cuobjdump to inspect it."""
    info = _C.build_info()
    if not info["cuda"]:
        message = f"promptkit._C was built without CUDA ({info['why_no_cuda']})"
        if os.environ.get("PROMPTKIT_EXPECT_CUDA_BUILD") == "1":
            pytest.fail(message + ", but PROMPTKIT_EXPECT_CUDA_BUILD=1")
        pytest.skip(message)
    if cuobjdump() is None:
        pytest.fail("promptkit._C holds CUDA kernels but no cuobjdump was found to inspect them")
    return Path(_C.__file__)


def test_cuda_module_kernels_fit():
    """Every kernel of promptkit._C, for each architecture it was built for, fits one block of its launch bounds."""
    info = _C.build_info()
    binary = _cuda_binary()
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


# ---------------------------------------------------------------- the CUDA module's products on tensor cores

# The tile products of csrc/cuda/product.cuh, as their template argument appears in the mangled kernel names, and
# the multiply instruction each must compile to: fp16 and bf16 to HMMA with fp32 accumulation, fp32 to TF32 HMMA
# (the variant that runs where torch allows TF32) or, exactly, FFMA; fp64 to DFMA. The exact products must hold
# no HMMA at all.
PRODUCTS = {
    "fp16": ("13TensorProductI6__half", "HMMA.16816.F32"),
    "bf16": ("13TensorProductI13__nv_bfloat16", "HMMA.16816.F32.BF16"),
    "tf32": ("13TensorProductIf", "HMMA.1684.F32.TF32"),
    "fp32": ("13ScalarProductIf", "FFMA"),
    "fp64": ("13ScalarProductId", "DFMA"),
}
# The kernels each product must appear in: product_kernel with each epilogue of csrc/cuda/softmax.cu (xent kinds
# 0-2 each), and the ortho Gram kernel; the tensor-core products also in ortho's gradient.
SOFTMAX_EPILOGUES = {"CosineEpilogue", "SegmentEpilogue", "XentFwdEpilogue0", "XentFwdEpilogue1", "XentFwdEpilogue2",
                     "MultilabelFwdEpilogue", "XentBwdEpilogue0", "XentBwdEpilogue1", "XentBwdEpilogue2",
                     "MultilabelBwdEpilogue"}
ORTHO_KERNELS = {"ortho_gram_kernel", "ortho_bwd_tc_kernel"}
# Shared memory per SM (bytes): two blocks must fit (cuobjdump's figure already holds the 1 KB a block reserves).
SM_SHARED = {80: 167_936, 90: 233_472}
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def _sass_opcodes(binary: Path) -> dict[str, dict[str, dict[str, int]]]:
    """{arch: {mangled kernel: {opcode: count}}} from ``cuobjdump -sass``."""
    text = subprocess.run([cuobjdump(), "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    opcodes: dict[str, dict[str, dict[str, int]]] = {}
    arch = kernel = None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            kernel = m.group(1)
            opcodes.setdefault(arch, {})[kernel] = {}
        elif kernel is not None and (m := _SASS_LINE.match(line)):
            counts = opcodes[arch][kernel]
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return opcodes


def _role(kernel: str) -> str | None:
    """What a product kernel computes: its epilogue (with the xent kind) or its ortho kernel; None otherwise."""
    if m := re.search(r"product_kernel.*?\d+([A-Z][A-Za-z]*Epilogue)I[fd](?:Li(\d)E)?", kernel):
        return m.group(1) + (m.group(2) or "")
    return next((name for name in ORTHO_KERNELS if name in kernel), None)


@pytest.fixture(scope="module")
def cuda_sass() -> dict[str, dict[str, dict[str, int]]]:
    return _sass_opcodes(_cuda_binary())


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_cuda_products_use_tensor_cores(cuda_sass, product):
    """Each product kernel, for each architecture, multiplies with its product's instruction: HMMA for fp16, bf16
    and TF32, FFMA / DFMA and no HMMA for the exact fp32 and fp64 products. Prints the evidence (pytest -s)."""
    mangled, instruction = PRODUCTS[product]
    usage = resource_usage(Path(_C.__file__))
    archs = {f"sm_{arch.split('-')[0]}" for arch in _C.build_info()["cuda_archs"].split(",")}
    for arch in sorted(archs):
        kernels = {name: ops for name, ops in cuda_sass[arch].items() if mangled in name}
        roles = {_role(name) for name in kernels}
        expected = SOFTMAX_EPILOGUES | ({"ortho_gram_kernel"} | (ORTHO_KERNELS if "Tensor" in mangled else set()))
        assert roles == expected, f"{product} on {arch}: kernels {sorted(map(str, roles))}, expected {sorted(expected)}"
        for name, ops in kernels.items():
            hmma = sum(n for op, n in ops.items() if op.startswith("HMMA"))
            res = usage[arch][name]
            print(f"{arch} {product:4} {_role(name):22} {instruction} x{ops.get(instruction, 0):<3} HMMA x{hmma:<3} "
                  f"REG {res['registers']:3} SHARED {res['shared']:6} STACK {res['stack']} LOCAL {res['local']}")
            assert ops.get(instruction, 0) > 0, f"{name} on {arch} holds no {instruction}"
            if instruction.startswith("HMMA"):
                assert hmma == ops[instruction], f"{name} on {arch}: HMMA of another type: {ops}"
            else:
                assert hmma == 0, f"{name} on {arch}: the exact {product} product holds {hmma} HMMA"
            # two resident blocks an SM, which the column-chunk plan of csrc/cuda/softmax.cu counts on
            number = int(arch.removeprefix("sm_"))
            registers = -(-res["registers"] // 8) * 8  # allocated in units of 8 a thread
            assert 2 * registers * 256 <= REGISTER_FILE, f"{name} on {arch}: {res['registers']} registers"
            if number in SM_SHARED:
                assert 2 * res["shared"] <= SM_SHARED[number], f"{name} on {arch}: {res['shared']} B"



# ---------------------------------------------------------------- the CUDA products' TF32 switch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
# Each script sets torch's TF32 switch in one way and prints what the header reads: legacy and new APIs are
# checked in separate processes, as torch refuses to report a state set through both.
TF32_SCRIPT = """
import ctypes, sys, torch
from promptkit.kernels._common import cuda_matmul_allows_tf32
allows = ctypes.CDLL(sys.argv[1]).promptkit_torch_allows_tf32
seen, triton = [allows()], [int(cuda_matmul_allows_tf32())]
for step in sys.argv[2:]:
    exec(step)
    seen.append(allows())
    triton.append(int(cuda_matmul_allows_tf32()))
print([seen, triton])
"""
TF32_SETTINGS = {
    "legacy": (["torch.set_float32_matmul_precision('high')", "torch.set_float32_matmul_precision('highest')",
                "torch.set_float32_matmul_precision('medium')", "torch.backends.cuda.matmul.allow_tf32 = False",
                "torch.backends.cuda.matmul.allow_tf32 = True"], [0, 1, 0, 1, 0, 1]),
    "fp32_precision": (["torch.backends.cuda.matmul.fp32_precision = 'tf32'",
                        "torch.backends.cuda.matmul.fp32_precision = 'ieee'"], [0, 1, 0]),
}


@pytest.fixture(scope="module")
def tf32_probe(tmp_path_factory) -> Path:
    """csrc/cuda/tf32.h compiled alone (it is plain C++) into a library exporting its answer."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the csrc/cuda/tf32.h probe")
    out = tmp_path_factory.mktemp("tf32")
    source = out / "probe.cpp"
    source.write_text('#include "cuda/tf32.h"\n'
                      'extern "C" int promptkit_torch_allows_tf32() { return pk::cuda::torch_allows_tf32(); }\n')
    library = out / "libprobe.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}", str(source), "-o", str(library),
                    "-ldl"], check=True, capture_output=True, text=True)
    return library


@pytest.mark.parametrize("api", list(TF32_SETTINGS))
def test_cuda_products_follow_torchs_tf32_switch(tf32_probe, api):
    """fp32 runs on TF32 tensor cores exactly when torch allows TF32 for float32 matmuls (off by default), on the
    CUDA kernels (csrc/cuda/tf32.h) and the Triton ones (their tl.dot precision) alike."""
    pytest.importorskip("triton")
    steps, expected = TF32_SETTINGS[api]
    # outside the source tree, whose promptkit/ lacks the installed promptkit.kernels
    result = subprocess.run([sys.executable, "-c", TF32_SCRIPT, str(tf32_probe), *steps], capture_output=True,
                            text=True, check=True, cwd=tf32_probe.parent)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [expected, expected], result.stderr


# ---------------------------------------------------------------- the CUDA reductions' split-and-merge arithmetic

# softmax.cu's reductions, emulated on the host with the csrc/common functions the CUDA kernels call, in the CUDA
# kernels' order: lane q of a row folds the columns q + 4 j of each 64-column tile, the 4 lanes merge by xor
# butterfly, and chunks of W columns merge in chunk order (a segment: its pieces between chunk boundaries).
# Compared with the CPU backend, which folds each row in one pass.
SPLIT_SOURCE = r"""
#include <cstdint>
#include "common/online_lse.h"
#include "common/xent.h"
using namespace pk;
using std::int64_t;

template <class St, class Push, class Merge> St fold(int64_t begin, int64_t end, St empty, Push push, Merge merge) {
  St lane[4] = {empty, empty, empty, empty};
  for (int64_t c = begin; c < end; ++c) push(lane[c % 4], c);  // tiles start at multiples of 64: lane = c % 4
  for (int offset = 2; offset > 0; offset >>= 1) {
    St next[4];
    for (int q = 0; q < 4; ++q) next[q] = merge(lane[q], lane[q ^ offset]);
    for (int q = 0; q < 4; ++q) lane[q] = next[q];
  }
  return lane[0];
}

template <class A, int KIND> void xent_rows(const A* cos, int64_t B, int64_t N, A scale, const int64_t* labels,
                                            const A* targets, int64_t W, A* loss, A* lse) {
  const A inv_n = A(1) / A(N);
  const int64_t chunks = (N + W - 1) / W;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t label = KIND == kXentIndex ? labels[b] : -1;
    const auto push = [&](XentState<A>& st, int64_t c) {
      const A dense = KIND == kXentDense ? targets[b * N + c] : A(0);
      xent_push(st, mul_rn(scale, cos[b * N + c]), xent_weight<KIND>(c, label, inv_n, dense));
    };
    const auto merge = [](XentState<A> x, XentState<A> y) { return xent_merge(x, y); };
    XentState<A> st = xent_empty<A>();
    for (int64_t j = 0; j < chunks; ++j) {
      const XentState<A> part = fold(j * W, j * W + W < N ? j * W + W : N, xent_empty<A>(), push, merge);
      st = chunks == 1 ? part : xent_merge(st, part);
    }
    xent_finish<KIND>(st, false, loss + b, lse + b);
  }
}

template <class A> void xent(const A* cos, int64_t B, int64_t N, A scale, int kind, const int64_t* labels,
                             const A* targets, int64_t W, A* loss, A* lse) {
  if (kind == kXentIndex) xent_rows<A, kXentIndex>(cos, B, N, scale, labels, targets, W, loss, lse);
  if (kind == kXentUniform) xent_rows<A, kXentUniform>(cos, B, N, scale, labels, targets, W, loss, lse);
  if (kind == kXentDense) xent_rows<A, kXentDense>(cos, B, N, scale, labels, targets, W, loss, lse);
}

template <class A> void segments(const A* cos, int64_t B, int64_t N, const int64_t* offsets, const A* scales,
                                 int64_t S, int64_t W, A* out_max, A* out_min, A* out_lse) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const auto push = [&](SegmentState<A>& st, int64_t c) { segment_push(st, mul_rn(scales[s], cos[b * N + c])); };
      const auto merge = [](SegmentState<A> x, SegmentState<A> y) { return segment_merge(x, y); };
      SegmentState<A> st = segment_empty<A>();
      bool first = true;
      for (int64_t lo = offsets[s]; first || lo < offsets[s + 1]; first = false) {  // pieces between boundaries
        const int64_t boundary = (lo / W + 1) * W, hi = boundary < offsets[s + 1] ? boundary : offsets[s + 1];
        const SegmentState<A> piece = fold(lo, hi, segment_empty<A>(), push, merge);
        st = first ? piece : segment_merge(st, piece);
        lo = hi;
      }
      const int64_t o = b * S + s;
      segment_finish(st.lse, st.min, out_max + o, out_min + o, out_lse + o);
    }
}

extern "C" {
void xent_f32(const float* c, int64_t B, int64_t N, float scale, int kind, const int64_t* labels, const float* t,
              int64_t W, float* loss, float* lse) { xent(c, B, N, scale, kind, labels, t, W, loss, lse); }
void xent_f64(const double* c, int64_t B, int64_t N, double scale, int kind, const int64_t* labels, const double* t,
              int64_t W, double* loss, double* lse) { xent(c, B, N, scale, kind, labels, t, W, loss, lse); }
void segments_f32(const float* c, int64_t B, int64_t N, const int64_t* o, const float* s, int64_t S, int64_t W,
                  float* mx, float* mn, float* lse) { segments(c, B, N, o, s, S, W, mx, mn, lse); }
void segments_f64(const double* c, int64_t B, int64_t N, const int64_t* o, const double* s, int64_t S, int64_t W,
                  double* mx, double* mn, double* lse) { segments(c, B, N, o, s, S, W, mx, mn, lse); }
}
"""


@pytest.fixture(scope="module")
def split_emulation(tmp_path_factory):
    """SPLIT_SOURCE compiled with the host flags of the CPU kernels (no FMA contraction)."""
    import ctypes

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the split-and-merge emulation")
    out = tmp_path_factory.mktemp("split")
    (out / "split.cpp").write_text(SPLIT_SOURCE)
    library = out / "libsplit.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC", f"-I{CSRC}",
                    str(out / "split.cpp"), "-o", str(library)], check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(library))
    for name in ("xent_f32", "xent_f64", "segments_f32", "segments_f64"):
        getattr(lib, name).restype = None
    return lib


def _special_cos(dtype: torch.dtype) -> torch.Tensor:
    """[6, 300] cosines with the rows that test the merge rule: ordinary, large (|z| ~ 1e4 after scaling), an
    all -inf row, a +inf entry, a NaN entry, and a row whose -inf columns fill whole chunks."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 300, generator=g, dtype=torch.float64).mul(2).sub(1).to(dtype)
    cos[1] *= 100
    cos[2] = -torch.inf
    cos[3, 170] = torch.inf
    cos[4, 5] = torch.nan
    cos[5, :200] = -torch.inf
    return cos.contiguous()


def _p(t: torch.Tensor):
    import ctypes

    return ctypes.c_void_p(t.data_ptr())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_cols", [64, 128, 320])
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["index", "uniform", "dense"])
def test_cuda_xent_split_matches_one_pass(split_emulation, dtype, chunk_cols, kind):
    import ctypes

    cos = _special_cos(dtype)
    B, N = cos.shape
    labels = torch.tensor([3, 299, 0, 170, 5, 250], dtype=torch.int64)
    targets = torch.rand(B, N, generator=torch.Generator().manual_seed(1), dtype=dtype)
    code = 0 if dtype == torch.float32 else 1
    scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    expected = [torch.empty(B, dtype=dtype) for _ in range(2)]
    _C.xent_fwd_cpu(cos.data_ptr(), B, N, 100.0, kind, labels.data_ptr(), targets.data_ptr(),
                    *(e.data_ptr() for e in expected), code)
    split = [torch.empty(B, dtype=dtype) for _ in range(2)]
    getattr(split_emulation, f"xent_f{'32' if code == 0 else '64'}")(
        _p(cos), ctypes.c_int64(B), ctypes.c_int64(N), scalar(100.0), ctypes.c_int(kind), _p(labels), _p(targets),
        ctypes.c_int64(chunk_cols), *(_p(s) for s in split))
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    for got, want in zip(split, expected):
        torch.testing.assert_close(got, want, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_cols", [64, 128, 320])
def test_cuda_segment_split_matches_one_pass(split_emulation, dtype, chunk_cols):
    """Segments crossing chunk boundaries, ending on them, and empty ones at 0, on a boundary and at N."""
    import ctypes

    cos = _special_cos(dtype)
    B, N = cos.shape
    offsets = torch.tensor([0, 0, 10, 128, 128, 150, 299, 300, 300], dtype=torch.int64)
    S = len(offsets) - 1
    scales = torch.linspace(0.5, 20.0, S, dtype=dtype)
    code = 0 if dtype == torch.float32 else 1
    expected = [torch.empty(B, S, dtype=dtype) for _ in range(3)]
    _C.segment_stats_cpu(cos.data_ptr(), B, N, offsets.data_ptr(), scales.data_ptr(), S,
                         *(e.data_ptr() for e in expected), code)
    split = [torch.empty(B, S, dtype=dtype) for _ in range(3)]
    getattr(split_emulation, f"segments_f{'32' if code == 0 else '64'}")(
        _p(cos), ctypes.c_int64(B), ctypes.c_int64(N), _p(offsets), _p(scales), ctypes.c_int64(S),
        ctypes.c_int64(chunk_cols), *(_p(s) for s in split))
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    for got, want in zip(split, expected):
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
