"""Running on several processes with PyTorch's own stack: ``torchrun`` + ``torch.distributed``.

Every rank runs the same program. ``init_distributed`` joins the process group that ``torchrun`` describes in its
environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and does nothing
when they are absent, so every helper below is also correct, and free, in a plain single process.

What is split across ranks:
- feature extraction: each rank encodes a contiguous run of the cache's fixed-size shards (``shard``);
- training: every rank holds the same prompts and draws the same global batch, keeps its contiguous part of it
  (``local_batch``), and the gradients are summed over ranks (``sum_gradients``) so that each step equals the
  single-process step on the whole batch;
- the text encoder: each rank encodes the prompts of a contiguous slice of the classes and the features are
  gathered with an autograd-aware all-gather (``encode_prompts``), so the encoder's activations per rank fall
  as 1/N.
"""

from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes reports and prints results (rank 0)."""
    return rank() == 0


def init_distributed(backend: str | None = None, timeout_minutes: float = 60.0) -> bool:
    """Join the process group described by torchrun's environment; a no-op when ``WORLD_SIZE`` is unset.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout_minutes: how long a collective may wait for the slowest rank (a long extraction shard
            ends in a barrier).
    Returns:
        True when this process is now part of a process group.
    Raises:
        ValueError: ``WORLD_SIZE``/``RANK`` are not integers, or ``RANK`` is outside ``0..WORLD_SIZE-1``.
    """
    if "WORLD_SIZE" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    try:
        world, this = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"init_distributed: WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} and "
                         f"RANK={os.environ.get('RANK')!r} must be integers (set by torchrun)") from None
    if not 0 <= this < world:
        raise ValueError(f"init_distributed: RANK={this} is outside 0..{world - 1} (WORLD_SIZE={world})")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def close_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK`` from torchrun, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: str) -> str:
    """The device this rank should use for ``device``: ``"cuda"`` becomes ``"cuda:<LOCAL_RANK>"`` under torchrun."""
    if device == "cuda" and is_distributed():
        return f"cuda:{local_rank()}"
    return device


def shard(n: int, parts: int | None = None, index: int | None = None) -> range:
    """The contiguous part of ``range(n)`` that rank ``index`` of ``parts`` owns (default: this rank of the world).

    The first ``n % parts`` parts hold one item more, so the parts differ in size by at most one and, read in
    rank order, cover ``range(n)`` once.
    """
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    if n < 0 or parts < 1 or not 0 <= index < parts:
        raise ValueError(f"shard: need n >= 0, parts >= 1 and 0 <= index < parts, got {n}, {parts}, {index}")
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank; lets all ranks stop together when one of them failed."""
    if not is_distributed():
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def sum_over_ranks(value: Tensor) -> Tensor:
    """The sum of ``value`` over ranks (a new tensor, not differentiable; ``value`` itself in one process)."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def broadcast_(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (replicated prompts start identical)."""
    if is_distributed():
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src)


def local_batch(index: Tensor) -> tuple[Tensor, float]:
    """This rank's part of a global batch and the weight of its mean loss in the global mean.

    Args:
        index: ``[B]`` sample indices of the global batch (the same on every rank).
    Returns:
        ``([B_r] local indices, B_r / B)``. A rank whose part is empty gets the batch's first sample with
        weight 0, so that it still joins the collectives of the step and adds nothing to the gradient.
    """
    mine = shard(len(index))
    part = index[mine.start:mine.stop]
    if len(part) == 0:
        return index[:1], 0.0
    return part, len(part) / len(index)


def sum_gradients(parameters: list[Tensor]) -> None:
    """Sum each parameter's ``.grad`` over ranks in place (one all-reduce of the flattened gradients).

    Each rank's loss is its share of the global mean (see ``local_batch``), so the sum is the gradient of the
    global mean; a parameter without a gradient counts as zero.
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def class_slice(n_classes: int) -> range | None:
    """The classes whose prompts this rank encodes, or None when every rank encodes all of them.

    Slicing needs at least one class per rank; with fewer classes than ranks each rank encodes all.
    """
    if not is_distributed() or n_classes < world_size():
        return None
    return shard(n_classes)


def encode_prompts(prompts, sets: list[int] | None = None) -> Tensor:
    """Text features of every class's prompts, the text-encoder work split over ranks by class.

    Each rank runs ``prompts(classes=<its class_slice>, sets=sets)`` and the slices are gathered with
    ``torch.distributed.nn.functional.all_gather``, whose backward sends each rank the gradient of its own
    slice summed over ranks. After ``sum_gradients`` the context gradient equals the single-process one.

    Args:
        prompts: a ``PromptLearner`` (C classes, K sets).
        sets: context-set indices (default all K).
    Returns:
        ``[K', C, E]`` raw text features (what ``prompts(sets=sets)`` returns), differentiable w.r.t. ``ctx``.
    """
    classes = class_slice(prompts.n_classes)
    if classes is None:
        return prompts(sets=sets)
    import torch.distributed.nn.functional as dist_nn  # autograd-aware collectives

    local = prompts(classes=list(classes), sets=sets)  # [K', C_r, E]
    widest = shard(prompts.n_classes, index=0).stop  # rank 0 holds the largest slice
    if local.shape[1] < widest:  # all_gather needs equal shapes: pad, then drop the padding
        pad = local.new_zeros(local.shape[0], widest - local.shape[1], local.shape[2])
        local = torch.cat([local, pad], dim=1)
    with warnings.catch_warnings():  # torch 2.15 deprecates it for a private module; it is the public API
        warnings.simplefilter("ignore", FutureWarning)
        pieces = dist_nn.all_gather(local)
    sizes = [len(shard(prompts.n_classes, index=r)) for r in range(world_size())]
    return torch.cat([_ContiguousGrad.apply(piece)[:, :size] for piece, size in zip(pieces, sizes)], dim=1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The backward of ``all_gather`` sends the pieces' gradients through ``all_to_all``, which on gloo reads a
    strided gradient (a class slice of ``[K, C, E]`` with K > 1) as if it were dense and mixes up its values.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _collective_device() -> torch.device:
    """Where small control tensors live: the rank's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
