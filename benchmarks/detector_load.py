"""Load time and memory of a deployed detector against the whole model, on a random-weight ViT-B-16.

    python benchmarks/detector_load.py [--classes imagenet1k] [--repeats 3]

Setup (once, in a temporary folder): random ViT-B-16 weights saved as safetensors, and an untrained CoOp run on
them for the class list (its save computes the text features of the C prompts). Then each measurement runs in a
fresh process, so that RSS is that load's alone:

- ``full``: what ``promptkit score`` did before the detector: ``load_clip`` of the whole model, ``load_method``,
  and the text features of the prompts (the first score computes them);
- ``detector``: ``Detector.load``: the image tower and the saved text features.

Printed: the median wall time of the load (after the imports), the peak RSS of the process (``VmHWM``, including
the imports' ~0.5 GB) and the bytes of the model parameters held.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _measure(kind: str, folder: Path) -> dict[str, float]:
    from promptkit import Detector
    from promptkit.clip import load_clip
    from promptkit.methods import load_method

    start = time.perf_counter()  # after the imports, which both take
    if kind == "full":
        clip = load_clip("ViT-B-16", folder / "vit-b-16.safetensors", quick_gelu=False)
        method = load_method(folder / "run", clip, backend="torch")
        method.text_features()
        model = clip.model
    else:
        model = Detector.load(folder / "run", backend="torch").clip.model
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "rss": _peak_rss(), "params": params}


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss would count the parent's peak from before the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _setup(folder: Path, classes: str) -> None:
    from safetensors.torch import save_file

    from promptkit.clip import load_clip
    from promptkit.data.classnames import class_list
    from promptkit.methods import CoOp

    clip = load_clip("ViT-B-16", "random")
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(folder / "vit-b-16.safetensors"))
    clip = load_clip("ViT-B-16", folder / "vit-b-16.safetensors", quick_gelu=False)
    method = CoOp(clip, class_list(classes), backend="torch")
    method.threshold = 0.5
    method.save(folder / "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="imagenet1k", help="class list of the CoOp run (default imagenet1k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=["full", "detector"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, Path(args.folder))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _setup(folder, args.classes)
        results = {}
        for kind in ("full", "detector"):
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--measure", kind, "--folder", tmp],
                                              check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                    for _ in range(args.repeats)]
            results[kind] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    full, det = results["full"], results["detector"]
    print(f"ViT-B-16 (random weights), CoOp on {args.classes}, median of {args.repeats} fresh processes")
    print(f"{'':10s} {'load s':>8s} {'peak RSS MiB':>13s} {'params MiB':>11s}")
    for kind, row in results.items():
        print(f"{kind:10s} {row['seconds']:8.2f} {row['rss'] / 2**20:13.0f} {row['params'] / 2**20:11.1f}")
    saved_rss, saved_params = (full["rss"] - det["rss"]) / 2**20, (full["params"] - det["params"]) / 2**20
    print(f"detector: {full['seconds'] / det['seconds']:.1f}x faster load, {saved_rss:.0f} MiB less peak RSS, "
          f"{saved_params:.0f} MiB fewer parameter bytes")


if __name__ == "__main__":
    main()
