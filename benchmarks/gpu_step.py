"""One LSN negative-prompt training step, timed: C = 1000 classes, K = 3 sets, random-weight ViT-B-16, bf16 autocast.

The step is LSN's (promptkit/methods/lsn.py, ``_fit_negatives``): encode set k's C class prompts, the negative
loss on a batch of image features plus the orthogonality term against the other sets (encoded once, frozen),
backward into the context, one Adam update. For each op backend it prints one JSON line with the median time per
step and the peak GPU memory, after the same warm-up steps for all. Each backend's first loss under bf16 must
match the fp32 loss within the suite's tolerance rule (twice eager torch's bf16 error plus a floor); the exit code
is 1 otherwise.

    python benchmarks/gpu_step.py                      # torch, triton and cuda on cuda
    python benchmarks/gpu_step.py --model promptkit-tiny --classes 10 --device cpu --backends torch,triton --steps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import open_clip
import torch

from promptkit import ops
from promptkit.clip import load_clip
from promptkit.distributed import encode_prompts
from promptkit.methods.lsn import LSN, LSNConfig


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def class_names(count: int) -> list[str]:
    """``count`` ImageNet class names (numbered past the 1000 there are)."""
    names = list(open_clip.IMAGENET_CLASSNAMES)
    return [names[i] if i < len(names) else f"class {i}" for i in range(count)]


def negative_loss(lsn: LSN, features: torch.Tensor, labels: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """LSN's loss while set 0 trains: the negative loss plus the orthogonality term against the frozen sets.

    features: [B, E] image features; labels: [B]; frozen: [K, C, E] text features of every set.
    """
    c = lsn.config
    current = encode_prompts(lsn.negative_prompts, sets=[0])[0]  # [C, E]
    sets = torch.cat([current[None], frozen[1:]]).transpose(0, 1)  # [C, K, E]
    return (lsn._negative_loss(features, current, labels)
            + c.ortho_weight * ops.orthogonality_loss(sets, "abs_sum", backend=lsn.backend))


def first_loss(lsn: LSN, features: torch.Tensor, labels: torch.Tensor, backend: str, bf16: bool) -> float:
    """The loss of the first step on ``backend``, under bf16 autocast or in plain fp32."""
    lsn.backend = backend
    with torch.no_grad(), torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=bf16):
        return float(negative_loss(lsn, features, labels, encode_prompts(lsn.negative_prompts)))


def time_backend(lsn: LSN, features: torch.Tensor, labels: torch.Tensor, backend: str, steps: int, warmup: int
                 ) -> dict:
    """Median time per step and peak memory of LSN's negative step on ``backend`` under bf16 autocast.

    features: [B, E] image features; labels: [B] class indices. The context is reset afterwards, so that every
    backend starts from the same prompts.
    """
    device = features.device
    lsn.backend = backend
    ctx = lsn.negative_prompts.ctx
    start = ctx.detach().clone()
    optimizer = torch.optim.Adam([ctx], lr=lsn.config.neg_lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        frozen = encode_prompts(lsn.negative_prompts)

    def step() -> None:
        with autocast:
            loss = negative_loss(lsn, features, labels, frozen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    with torch.no_grad():
        ctx.copy_(start)
    return dict(backend=backend, ms_per_step=1e3 * statistics.median(times), peak_mib=peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--batch", type=int, default=LSNConfig.neg_batch_size, help="images per step")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="torch,triton,cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    clip = load_clip(args.model, "random", device=device)
    lsn = LSN(clip, class_names(args.classes), LSNConfig(n_sets=args.sets))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, clip.embed_dim, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    # The suite's tolerance rule (tests/ops/conftest.py): a backend's bf16 loss may be off the fp32 one by twice
    # eager torch's own bf16 error, plus bf16's floor.
    truth = first_loss(lsn, features, labels, "torch", bf16=False)
    allowed = 2 * abs(first_loss(lsn, features, labels, "torch", bf16=True) - truth) + 2e-2 * max(1.0, abs(truth))
    ok = True
    for backend in args.backends.split(","):
        loss = first_loss(lsn, features, labels, backend, bf16=True)
        result = time_backend(lsn, features, labels, backend, args.steps, max(1, args.warmup))
        result.update(model=args.model, classes=args.classes, sets=args.sets, batch=args.batch, device=str(device),
                      autocast="bf16", first_loss=loss, fp32_loss=truth, allowed_error=allowed,
                      loss_matches=abs(loss - truth) <= allowed)
        ok &= result["loss_matches"]
        print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
