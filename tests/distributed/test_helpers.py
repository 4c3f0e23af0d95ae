"""The single-process behaviour of promptkit.distributed: sharding arithmetic and no-op collectives."""

from __future__ import annotations

import pytest
import torch

from promptkit import distributed


@pytest.mark.parametrize("n,parts", [(0, 1), (5, 2), (7, 3), (2, 4), (12, 4)])
def test_shards_are_contiguous_balanced_and_cover_once(n: int, parts: int) -> None:
    ranges = [distributed.shard(n, parts, i) for i in range(parts)]
    assert [i for r in ranges for i in r] == list(range(n))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shard: need"):
        distributed.shard(4, 2, 2)
    with pytest.raises(ValueError, match="shard: need"):
        distributed.shard(-1, 1, 0)


def test_single_process_helpers_are_identities(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    index = torch.tensor([4, 1, 3])
    local, share = distributed.local_batch(index)
    assert torch.equal(local, index) and share == 1.0
    assert distributed.class_slice(1000) is None and distributed.local_device("cuda") == "cuda"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    distributed.sum_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0, 3.0]


def test_init_rejects_a_bad_environment(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="RANK=5 is outside 0..1"):
        distributed.init_distributed()
