"""Two gloo processes, started by the test, against one process."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fastunlearn as fu


def make_problem(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randint(0, 256, (37, 3, 6, 6), generator=g, dtype=torch.uint8)  # 37: shards of unequal length
    y = torch.randint(0, 5, (37,), generator=g)
    return model, x, y


CFG = fu.UnlearnConfig(eps=0.1, steps=3, gamma=0.3, seed=4, relabel="soft", search_batch_size=8)


def _rank_main(rank, world, init_file, out_dir, seed):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, x, y = make_problem(seed)
        labels, ok = fu.boundary_relabel(model, x, y, config=CFG)
        torch.save({"labels": labels, "ok": ok}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_search_equals_one_process(tmp_path, gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rdzv"), str(tmp_path), seed), nprocs=2, join=True)
    model, x, y = make_problem(seed)
    labels, ok = fu.boundary_relabel(model, x, y, config=CFG)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["labels"], labels), rank
        assert torch.equal(got["ok"], ok), rank


def test_shard_bounds_cover_every_row():
    from fastunlearn.distributed import shard_bounds

    for n in (1, 2, 7, 37, 100):
        for world in (1, 2, 3, 8):
            spans = [shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
