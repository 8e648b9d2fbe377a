"""The methods under DDP: two CPU processes on gloo, each on its own data, must stay identical.

SpIEL's ranks choose their regrown entries from all-reduced statistics; SaRA's penalty and
progressive step and GGPO's noise run on the same all-reduced gradients and weights on every rank.
One spawn trains every setup; the tests compare what the two ranks saved.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


SETUPS = {
    "spiel-gradient": dict(density=0.05, reselection_steps=3, accumulation_steps=2, regrowth="gradient"),
    "spiel-momentum": dict(density=0.05, reselection_steps=3, accumulation_steps=2, regrowth="momentum"),
    "sara": dict(method="sara", density=0.05, nuclear_norm_weight=0.05, nuclear_norm_layers=14, progressive_step=3),
    "lora_ggpo": dict(method="lora_ggpo", perturbation_sigma=0.3, perturbation_beta=1.0),
    "rosa": dict(method="rosa", warmup_steps=3),  # the mask is chosen at step 3 from every rank's statistics
}
# every other discovered method with its preset: ranks must stay identical there too
SETUPS.update({name: dict(method=name) for name in __import__("sparse_peft").METHODS
               if name not in SETUPS and name not in ("spiel",)})


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    import sparse_peft  # noqa: F401
    from sparse_peft import SparseConfig, SparseLayer, SparseScheduler

    from tests.conftest import close_process_group, tiny_llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for name, fields in SETUPS.items():
        torch.manual_seed(0)  # the same model and start support on every rank
        model = get_peft_model(tiny_llama().train(), SparseConfig(target_modules="all-linear", **fields))
        # buffers are not broadcast, so that each rank's indices are its own selection
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = SparseScheduler(ddp, optimizer, total_steps=8)
        torch.manual_seed(100 + rank)  # different data on each rank
        for _ in range(6):
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
        del ddp, model, optimizer, scheduler
    close_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return {name: [torch.load(folder / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)] for name in SETUPS}


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_two_ranks_stay_identical(ranks, name):
    first, second = ranks[name]
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


@pytest.mark.parametrize("regrowth", ["gradient", "momentum"])
def test_spiel_ranks_regrow_entries(ranks, regrowth):
    from peft import get_peft_model

    from sparse_peft import SparseConfig

    from ..conftest import tiny_llama

    torch.manual_seed(0)
    start = get_peft_model(tiny_llama(), SparseConfig(target_modules="all-linear", density=0.05)).state_dict()
    state = ranks[f"spiel-{regrowth}"][0]
    moved = sum(not torch.equal(t, start[k]) for k, t in state.items() if k.endswith("sparse_indices.default"))
    assert moved > 0


def test_sara_froze_entries_and_ggpo_scaled_its_noise(ranks):
    assert any(k.endswith("sparse_frozen_slots.default") and t.numel() for k, t in ranks["sara"][0].items())
    assert any(k.endswith("noise_std") for k in ranks["lora_ggpo"][0])
