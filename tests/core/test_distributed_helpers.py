"""labelsieve.core.distributed in one process (what every command does without torchrun), and the share
arithmetic the ranks rely on; the several-process behaviour is tested in tests/test_distributed.py."""

from __future__ import annotations

import numpy as np
import torch

from labelsieve.core import distributed
from labelsieve.core.engine import make_loader


def test_one_process_answers_as_one_process():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert not distributed.init("cpu") and not distributed.sharding()
    assert distributed.run_on_main(lambda a, b=0: a + b, 2, b=3) == 5
    for helper in (distributed.run_on_all, distributed.computed_on_main, distributed.main_first):
        calls: list[int] = []
        assert helper(lambda a, b=0, seen=calls: seen.append(a) or a + b, 2, b=3) == 5 and calls == [2]  # once
    assert distributed.from_main([1, 2]) == [1, 2]
    assert distributed.broadcast_object("x") == "x" and distributed.all_gather_object(7) == [7]
    assert distributed.sum_over_ranks([1, 2.5]) == [1.0, 2.5] and distributed.all_true(True, False) == (True, False)
    ds = torch.utils.data.TensorDataset(torch.arange(10).float())
    loader = make_loader(list(range(10)), batch_size=4, shuffle=True, seed=0)
    assert not distributed.is_sharded(loader) and sorted(i for b in loader for i in b.tolist()) == list(range(10))
    assert not distributed.is_sharded(make_loader(ds, batch_size=4))


def test_shares_partition_in_order(monkeypatch):
    items = list(range(11))
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.share(items))
    assert [x for p in parts for x in p] == items and [len(p) for p in parts] == [3, 4, 4]
    order = np.array([5, 1, 4, 0, 2])  # a sampler's draws, split over 2 ranks, padded to equal lengths
    shares = [distributed.ShardSampler(order, num_replicas=2, rank=r) for r in range(2)]
    assert [list(s) for s in shares] == [[5, 4, 2], [1, 0, 5]] and len(shares[0]) == len(shares[1]) == 3
