"""`promptkit info` / `python -m promptkit.info`: versions, built backends and why any is missing."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import promptkit
from promptkit.ops import available_backends
from promptkit.ops._backends import compiled_module


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """A human-readable report of the installation."""
    lines = [f"promptkit {promptkit.__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    for package in ("torch", "open_clip_torch", "triton", "safetensors", "scikit-learn"):
        lines.append(f"{package} {package_version(package)}")
    module, why = compiled_module()
    if module is None:
        lines.append(f"compiled core: MISSING - {why}")
    else:
        build = module.build_info()
        lines.append(f"compiled core: promptkit._C {build['version']} ({build['compiler']}), "
                     f"OpenMP {'on, %d threads' % build['openmp_threads'] if build['openmp'] else 'off'}")
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
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
