"""Ahead-of-time compilation of promptkit's Triton kernels for a GPU target, without a GPU (test_gpu_compile.py).

Run as a script in its own process: Triton's interpreter, which the CPU tests turn on, also turns Triton's own
library functions (tl.sum, tl.cdiv) into interpreted ones that cannot be compiled, so compiling needs a process
started without TRITON_INTERPRET. ``python _triton_aot.py OUT.json JOB...`` with JOB = ``<variant id>@<arch>``
(``@fused`` appended: compile with FMA contraction forced on) writes one record per job to OUT.json.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str | None:
    """cuobjdump from the triton wheel, the CUDA toolkit or PATH."""
    try:
        import triton

        candidates = [Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"]
    except ImportError:
        candidates = []
    for candidate in candidates + [Path("/usr/local/cuda/bin/cuobjdump")]:
        if candidate.is_file():
            return str(candidate)
    return shutil.which("cuobjdump")


def resource_usage(binary: Path) -> dict[str, dict[str, dict[str, int]]]:
    """{arch ("sm_90", or "cubin"): {kernel: {registers, stack, shared, local}}} of a cubin or of the device code
    in a shared library: registers and stack (bytes; spilled registers live there) per thread, static shared and
    local memory (bytes) per block."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch, kernel = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif m := _RESOURCES.search(line):
            usage.setdefault(arch or "cubin", {})[kernel] = dict(zip(("registers", "stack", "shared", "local"),
                                                                     map(int, m.groups())))
    return usage


@dataclass(frozen=True)
class Variant:
    """One kernel compiled for one problem: ``<launch>(*args)`` in ``promptkit.kernels.<module>`` gives its Launch.

    pointers maps each pointer argument to its element type: "in" (the input dtype), "acc" (the accumulation
    dtype) or a Triton type; ints are the runtime integer arguments, specialised as Triton does at a launch
    (1 becomes a constant, multiples of 16 are marked divisible). no_fma: the PTX must hold no ``fma.rn.f32``,
    the instruction contraction makes of a multiply and an add (the launch turns contraction off; in half
    precision the dot runs on tensor cores, not FMAs; libdevice's log and exp polynomials use ``fma.rn.ftz``).
    """

    module: str
    kernel: str
    launch: str
    args: tuple
    dtype: torch.dtype
    pointers: dict[str, str]
    ints: dict[str, int]
    tf32: bool = False
    no_fma: bool = False
    tag: str = ""

    @property
    def id(self) -> str:
        dtype = TRITON_TYPES[self.dtype] + ("-tf32" if self.tf32 else "")
        return "-".join(filter(None, (self.kernel.strip("_").removesuffix("_kernel"), dtype, self.tag)))


HALF = (torch.float16, torch.bfloat16)


def _dot_variants() -> list[Variant]:
    from promptkit import kernels as K

    B, N = 1024, 1000
    out: list[Variant] = []
    cases = [(torch.float32, 100, False), (torch.float32, 512, True), (torch.float16, 512, False),
             (torch.bfloat16, 100, False), (torch.float64, 100, False)]
    for dtype, D, tf32 in cases:
        out.append(Variant("cosine", "_cosine_kernel", "cosine_launch", (B, N, D, dtype), dtype,
                           dict(img_ptr="in", txt_ptr="in", scale_ptr="acc", out_ptr="acc"), dict(B=B, N=N, D=D),
                           tf32=tf32, tag=f"D{D}"))
    S = 3
    for dtype, D, tf32 in cases:
        if not tf32:
            out.append(Variant("softmax_stats", "_segment_stats_kernel", "segment_stats_launch",
                               (B, 400, D, S, dtype), dtype,
                               dict(img_ptr="in", txt_ptr="in", offsets_ptr="i32", scales_ptr="acc", max_ptr="acc",
                                    min_ptr="acc", lse_ptr="acc"), dict(B=B, D=D, S=S), no_fma=dtype in HALF,
                               tag=f"D{D}"))
    kinds = sorted({getattr(K, name) for name in dir(K) if name.startswith("XENT_")})  # every kind exported
    cases = [(torch.float32, 100, kind) for kind in kinds] + [
        (torch.float16, 512, K.XENT_INDEX), (torch.bfloat16, 100, K.XENT_DENSE), (torch.float64, 100, K.XENT_INDEX)]
    for dtype, D, kind in cases:
        ints = dict(B=B, N=N, D=D, GROUP=4 if kind == getattr(K, "XENT_MULTILABEL", None) else 1)
        common = dict(img_ptr="in", txt_ptr="in", scale_ptr="acc", labels_ptr="i64", targets_ptr="acc")
        out.append(Variant("xent", "_xent_fwd_kernel", "xent_launch", (B, N, D, dtype, kind, False), dtype,
                           dict(common, loss_ptr="acc", lse_ptr="acc"), ints, no_fma=dtype in HALF,
                           tag=f"kind{kind}-D{D}"))
        out.append(Variant("xent", "_xent_bwd_kernel", "xent_launch", (B, N, D, dtype, kind, True), dtype,
                           dict(common, mass_ptr="acc", lse_ptr="acc", grad_ptr="acc", dcos_ptr="acc"), ints,
                           no_fma=dtype in HALF, tag=f"kind{kind}-D{D}"))
    return out


def _row_variants() -> list[Variant]:
    R = 100_000
    out: list[Variant] = []
    for dtype, D in [(torch.float32, 100), (torch.float16, 512), (torch.bfloat16, 4096), (torch.float64, 100)]:
        out.append(Variant("rowops", "_l2norm_fwd_kernel", "rows_launch", (R, D), dtype,
                           dict(x_ptr="in", eps_ptr="acc", y_ptr="in", inv_ptr="acc"), dict(R=R, D=D), tag=f"D{D}"))
        out.append(Variant("rowops", "_mix_kernel", "rows_launch", (R, D), dtype,
                           dict(a_ptr="in", b_ptr="in", lam_ptr="acc", eps_ptr="acc", out_ptr="acc"),
                           dict(R=R, D=D), tag=f"D{D}"))
    # the op layer hands l2norm_bwd fp32 gradients of half rows
    for dtype, dy, D in [(torch.float32, "in", 100), (torch.float16, "fp32", 512), (torch.bfloat16, "fp32", 100),
                         (torch.float64, "in", 4096)]:
        out.append(Variant("rowops", "_l2norm_bwd_kernel", "rows_launch", (R, D), dtype,
                           dict(dy_ptr=dy, y_ptr="in", inv_ptr="acc", eps_ptr="acc", dx_ptr="acc"), dict(R=R, D=D),
                           tag=f"dy-{dy}-D{D}"))
    return out


def _ortho_variants() -> list[Variant]:
    C = 1000
    # K = 256 and 100: several K tiles (the largest tile); K = 3: one small tile
    cases = [(torch.float32, 256, 0, 512), (torch.float32, 256, 1, 100), (torch.float16, 256, 0, 100),
             (torch.bfloat16, 100, 1, 512), (torch.float64, 256, 0, 512), (torch.float64, 100, 1, 100),
             (torch.float32, 3, 0, 100), (torch.float16, 3, 1, 512)]
    out: list[Variant] = []
    for dtype, K, mode, D in cases:
        tag = f"mode{mode}-K{K}-D{D}"
        out.append(Variant("ortho", "_ortho_fwd_kernel", "ortho_launch", (C, K, D, dtype, mode), dtype,
                           dict(yn_ptr="in", part_ptr="acc"), dict(K=K, D=D), tag=tag))
        out.append(Variant("ortho", "_ortho_bwd_kernel", "ortho_launch", (C, K, D, dtype, mode), dtype,
                           dict(yn_ptr="in", coef_ptr="acc", dyn_ptr="acc"), dict(K=K, D=D), tag=tag))
    return out


VARIANTS = {v.id: v for v in _dot_variants() + _row_variants() + _ortho_variants()}


def plan_of(variant: Variant):
    """The Launch the host code computes for this variant (TF32 allowed when the variant says so)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if variant.tf32 else "highest")
    try:
        return getattr(importlib.import_module(f"promptkit.kernels.{variant.module}"), variant.launch)(*variant.args)
    finally:
        torch.set_float32_matmul_precision(precision)


def source_of(variant: Variant, plan):
    """The kernel with the signature, constants and divisibility attributes that a launch of this variant gives."""
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"promptkit.kernels.{variant.module}"), variant.kernel)
    acc = "fp64" if variant.dtype == torch.float64 else "fp32"
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in plan.constants:
            signature[name], constants[name] = "constexpr", plan.constants[name]
        elif name in variant.pointers:
            kind = variant.pointers[name]
            signature[name] = "*" + {"in": TRITON_TYPES[variant.dtype], "acc": acc}.get(kind, kind)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif name in variant.ints:
            value = variant.ints[name]
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{variant.id}: no type given for argument {name}")
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def compile_job(job: str, scratch: Path) -> dict:
    """Compile one ``<variant id>@<arch>[@fused]`` job and report what the GPU would need to run it."""
    import triton
    from triton.backends.compiler import GPUTarget

    variant_id, arch, *flags = job.split("@")
    variant = VARIANTS[variant_id]
    plan = plan_of(variant)
    options = {**plan.options, **({"enable_fp_fusion": True} if "fused" in flags else {})}
    compiled = triton.compile(source_of(variant, plan), target=GPUTarget("cuda", int(arch), 32), options=options)
    cubin = scratch / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    ((resources,),) = [list(kernels.values()) for kernels in resource_usage(cubin).values()]
    return dict(job=job, dynamic_shared=compiled.metadata.shared, threads=compiled.metadata.num_warps * 32,
                fma=len(re.findall(r"^\s*fma\.rn\.f(?:32|64)\b", compiled.asm["ptx"], re.M)), **resources)


def main(out: str, jobs: list[str]) -> None:
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for job in jobs:
            try:
                records.append(compile_job(job, Path(scratch)))
            except Exception as error:  # reported per job by the test, which names the variant
                records.append(dict(job=job, error=f"{type(error).__name__}: {error}"))
    Path(out).write_text(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
