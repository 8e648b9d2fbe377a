"""SaRA's penalty and progressive step, and GGPO's noise, under DDP: two CPU ranks on gloo, different
data, must stay identical (each rank runs the hooks on the same all-reduced gradients and weights)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


CONFIGS = {
    "sara": dict(method="sara", density=0.05, nuclear_norm_weight=0.05, nuclear_norm_layers=14, progressive_step=3),
    "lora_ggpo": dict(method="lora_ggpo", perturbation_sigma=0.3, perturbation_beta=1.0),
}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    import sparse_peft  # noqa: F401
    from sparse_peft import SparseConfig, SparseLayer, SparseScheduler

    from tests.conftest import tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for name, fields in CONFIGS.items():
        torch.manual_seed(0)  # the same model on every rank
        model = get_peft_model(tiny_llama().train(), SparseConfig(target_modules="all-linear", **fields))
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = SparseScheduler(ddp, optimizer, total_steps=6)
        torch.manual_seed(100 + rank)  # different data on each rank
        for _ in range(5):
            ids = torch.randint(0, 128, (2, 10))
            ddp(input_ids=ids, labels=ids).loss.backward()
            scheduler.before_optimizer_step()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if "sparse_" in k}
        for key, layer in model.named_modules():
            if isinstance(layer, SparseLayer) and "default" in layer.sparse_noise:
                state[f"{key}.noise_std"] = layer.sparse_noise["default"][0].clone()
        torch.save(state, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_stay_identical_under_the_methods_hooks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name in CONFIGS:
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]
        assert ranks[0].keys() == ranks[1].keys()
        for key, tensor in ranks[0].items():
            assert torch.equal(tensor, ranks[1][key]), (name, key)
        if name == "sara":  # the progressive step ran and froze something
            assert any(k.endswith("sparse_frozen_slots.default") and t.numel() for k, t in ranks[0].items())
        else:  # the noise scale carries the gradient term
            assert any(k.endswith("noise_std") for k in ranks[0])
