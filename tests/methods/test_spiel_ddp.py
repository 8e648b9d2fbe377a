"""SpIEL under DDP: two CPU processes on gloo must make identical selections from different data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    import sparse_peft
    from sparse_peft import SparseConfig, SparseScheduler

    from tests.conftest import tiny_llama

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for regrowth in ("gradient", "momentum"):
        torch.manual_seed(0)  # same model and start support on every rank
        config = SparseConfig(
            target_modules="all-linear", density=0.05, reselection_steps=3, accumulation_steps=2, regrowth=regrowth
        )
        model = get_peft_model(tiny_llama().train(), config)
        # buffers are not broadcast, so that each rank's indices are its own selection
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = SparseScheduler(ddp, optimizer, total_steps=8)
        torch.manual_seed(100 + rank)  # different data on each rank
        for _ in range(6):
            ids = torch.randint(0, 128, (2, 10))
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        state = {k: v for k, v in model.state_dict().items() if "sparse_" in k}
        torch.save(state, os.path.join(out_dir, f"{regrowth}-rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_select_the_same_support(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    from peft import get_peft_model

    from sparse_peft import SparseConfig

    from ..conftest import tiny_llama

    torch.manual_seed(0)
    start = get_peft_model(tiny_llama(), SparseConfig(target_modules="all-linear", density=0.05))
    start_indices = {k: v for k, v in start.state_dict().items() if k.endswith("sparse_indices.default")}
    for regrowth in ("gradient", "momentum"):
        ranks = [torch.load(tmp_path / f"{regrowth}-rank{r}.pt", weights_only=True) for r in range(2)]
        moved = 0
        for key, tensor in ranks[0].items():
            assert torch.equal(tensor, ranks[1][key]), (regrowth, key)
            if key in start_indices:
                moved += int(not torch.equal(tensor, start_indices[key]))
        assert moved > 0, regrowth
