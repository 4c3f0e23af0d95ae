"""`promptkit info` / `python -m promptkit.info`: versions, built backends and why any is missing, the optional
extras installed, and how each kind of text tower is shortened for prompt learning."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from promptkit.version import __version__
from promptkit.ops import available_backends
from promptkit.ops._backends import compiled_module

# pyproject.toml's optional extras: the packages each installs (import names) and what they enable
EXTRAS = {
    "hf": (("transformers",), "SigLIP/SigLIP2 tokenizers and Hugging Face text towers (roberta, xlm-roberta, mt5)"),
    "plot": (("matplotlib",), "score histograms and ROC curves (--plots)"),
    "triton": (("triton",), "the Triton kernels on GPUs (--backend triton, auto's choice on CUDA)"),
    "generate": (("diffusers", "transformers"), "LAPT's image generation (promptkit collect --generate MODEL)"),
}
# the open_clip towers each rule of promptkit.clip.text.LENGTH_RULES applies to
TOWER_RULES = {
    "causal": "CLIP, EVA, MetaCLIP, DFN (causal, pooled at [EOS])",
    "padding-mask": "CoCa, Hugging Face towers, use_pad_mask TextTransformers",
    "full": "SigLIP, SigLIP2, CLIPA, MobileCLIP2 (bidirectional, no padding mask)",
}


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def extras() -> list[str]:
    """One line per optional extra: installed or not (and how to get it), and what it enables."""
    lines = []
    for extra, (modules, enables) in EXTRAS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            state = f"no  - {', '.join(missing)} missing, pip install \"promptkit[{extra}]\""
        else:
            state = "yes (" + ", ".join(f"{m} {package_version(m)}" for m in modules) + ")"
        lines.append(f"  {extra:9s}{state}: {enables}")
    return lines


# What the cpp backend runs on each vector ISA (promptkit._C.vector_isa_cpu()).
CPU_LOOPS = {
    "avx512": "AVX-512 exp passes; the scores' products stay with torch's BLAS",
    "avx2": "AVX2 + FMA exp passes; the scores run promptkit's fused product",
    "portable": "compiler-vectorised passes; torch's BLAS products",
}


def report() -> str:
    """A human-readable report of the installation."""
    lines = [f"promptkit {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for package in ("torch", "open_clip_torch", "triton", "safetensors", "scikit-learn"):
        lines.append(f"{package} {package_version(package)}")
    module, why = compiled_module()
    if module is None:
        lines.append(f"compiled core: MISSING - {why}")
    else:
        build = module.build_info()
        lines.append(f"compiled core: promptkit._C {build['version']} ({build['compiler']}), "
                     f"OpenMP {'on, %d threads' % build['openmp_threads'] if build['openmp'] else 'off'}")
        lines.append(f"CPU vector loops: {module.vector_isa_cpu()} ({CPU_LOOPS[module.vector_isa_cpu()]})")
        if build["cuda"]:
            archs = ", ".join(f"sm_{a}" for a in build["cuda_archs"].replace(";", ",").split(","))
            lines.append(f"CUDA kernels: built with CUDA {build['cuda_version']} for {archs}")
        else:
            lines.append(f"CUDA kernels: not built ({build['why_no_cuda']})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"GPU: {gpu}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append(f"backends on {device}:")
        for name, why in available_backends(device).items():
            lines.append(f"  {name:7s} {'yes' if not why else 'no  - ' + why}")
    lines.append("extras:")
    lines += extras()
    from promptkit.clip.text import LENGTH_RULES  # imports open_clip: only here

    lines.append("text towers in prompt learning (each equals open_clip's encode_text):")
    lines += [f"  {TOWER_RULES[rule]}: {how}" for rule, how in LENGTH_RULES.items()]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
