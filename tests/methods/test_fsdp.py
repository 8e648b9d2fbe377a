"""The scheduled methods under FSDP2 (torch's fully_shard, two gloo CPU ranks) end with the adapter DDP ends with.

Each rank trains the same model on its own data, once wrapped in DDP and once sharded by fully_shard;
SpIEL's regrowth, SaRA's penalty and progressive freeze, GGPO's noise and RoSA's mask read and write
whole tensors through full.py. Equal within 1e-6, indices exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ..conftest import assert_loads_as_trained, assert_same_adapter, spawn_runs


SETUPS = {
    "spiel": dict(method="spiel", density=0.05, reselection_steps=3, accumulation_steps=2),
    "spiel-momentum": dict(method="spiel", density=0.05, reselection_steps=3, accumulation_steps=2, regrowth="momentum"),
    "sara": dict(method="sara", density=0.05, nuclear_norm_weight=0.05, nuclear_norm_layers=14, progressive_step=3),
    "lora_ggpo": dict(method="lora_ggpo", perturbation_sigma=0.3, perturbation_beta=1.0),
    "rosa": dict(method="rosa", warmup_steps=3),
}
STEPS = 6


def _train(engine: str, fields: dict, rank: int, save_to: str = "") -> dict:
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from sparse_peft import SparseConfig, SparseLayer, SparseScheduler
    from sparse_peft.full import full
    from tests.conftest import tiny_llama

    torch.manual_seed(0)  # the same model and start support on every rank
    model = get_peft_model(tiny_llama().train(), SparseConfig(target_modules="all-linear", **fields))
    if engine == "fsdp2":
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        wrapped = fully_shard(model)
    else:
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    SparseScheduler(wrapped, optimizer, total_steps=STEPS + 2)
    torch.manual_seed(100 + rank)  # different data on each rank
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (2, 10))
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if save_to:  # every rank gathers its shards; one writes
        model.save_pretrained(save_to, is_main_process=rank == 0)
    state = {k: full(v).clone() for k, v in model.state_dict().items() if "sparse_" in k}
    for key, layer in model.named_modules():
        if isinstance(layer, SparseLayer) and "default" in layer.sparse_noise:
            state[f"{key}.noise_std"] = layer.sparse_noise["default"][0].clone()
    return state


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import sparse_peft  # noqa: F401
    from tests.conftest import close_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for name, fields in SETUPS.items():
        for engine in ("ddp", "fsdp2"):
            save_to = os.path.join(out_dir, f"{name}-adapter") if engine == "fsdp2" else ""
            state = _train(engine, fields, rank, save_to)
            torch.save(state, os.path.join(out_dir, f"{name}-{engine}-rank{rank}.pt"))
    close_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn_runs(tmp_path_factory, _worker, "fsdp", SETUPS, ("ddp", "fsdp2"))


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_fsdp2_ends_with_the_adapter_ddp_ends_with(runs, name):
    assert_same_adapter(runs[(name, "ddp", 0)], runs[(name, "fsdp2", 0)], runs[(name, "fsdp2", 1)], atol=1e-6)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_an_adapter_saved_under_fsdp2_is_whole_and_loads_into_one_process(runs, name):
    assert_loads_as_trained(runs["folder"] / f"{name}-adapter", runs[(name, "fsdp2", 0)])


def test_fsdp1_is_refused_naming_fsdp2():
    # FSDP1 needs an accelerator (it refuses to start on CPU); what it leaves on the parameters is enough here
    from peft import get_peft_model

    from sparse_peft import SparseConfig, SparseScheduler

    from ..conftest import tiny_llama

    model = get_peft_model(tiny_llama().train(), SparseConfig(method="sara", target_modules="all-linear"))
    next(model.parameters())._fsdp_flattened = True  # FSDP1's mark on the parameters it flattened
    with pytest.raises(ValueError, match="FSDP1's flat parameters do not support: use FSDP2"):
        SparseScheduler(model, None, total_steps=4)
