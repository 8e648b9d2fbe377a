"""RoSA: LoRA alone during the warm-up, a mask from accumulated squared gradients, then both parts train."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from sparse_peft import SparseConfig, SparseLayer, SparseScheduler

from ..conftest import tiny_llama, trainer_run_and_resume


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 12), generator=g) for _ in range(n)]


def test_the_mask_is_the_top_k_of_the_squared_gradients_summed_over_the_warm_up():
    """Against exact dense accumulation (float64, every backward's full dW), the pool's mask keeps >= 90 %."""
    warmup = 4
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="rosa", warmup_steps=warmup, density=0.05))
    layers = _layers(model)
    exact = {n: torch.zeros(m.delta_shape, dtype=torch.float64) for n, m in layers.items()}
    inputs = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            def add(dy):  # a tensor hook that returns None leaves the gradient as it is
                exact[name].add_((dy.reshape(-1, dy.shape[-1]).double().T @ inputs[name]) ** 2)

            output.register_hook(add)
        return hook

    handles = [m.register_forward_hook(keep_input(n)) for n, m in layers.items()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # the base and B stay put
    SparseScheduler(model, opt, total_steps=10)
    for x in _batches(warmup):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for h in handles:
        h.remove()
    recalls = []
    for n, m in layers.items():
        k = m.sparse_indices["default"].numel()
        best = set(torch.topk(exact[n].reshape(-1), k).indices.tolist())
        recalls.append(len(best & set(m.sparse_indices["default"].tolist())) / k)
    print(f"RoSA mask recall against exact accumulation: mean {sum(recalls) / len(recalls):.3f}, min {min(recalls):.3f}")
    assert sum(recalls) / len(recalls) >= 0.9 and min(recalls) >= 0.75


def test_only_the_lora_trains_during_the_warm_up_then_both_do():
    warmup = 3
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="rosa", warmup_steps=warmup))
    layer = next(iter(_layers(model).values()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    SparseScheduler(model, opt, total_steps=6)
    start = layer.sparse_indices["default"].clone()
    b_start = layer.sparse_lora_B["default"].detach().clone()
    for t, x in enumerate(_batches(5), start=1):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        values = layer.sparse_values["default"]
        if t <= warmup:
            assert float(values.abs().sum()) == 0 and values not in opt.state  # no update, no state
        if t < warmup:
            assert torch.equal(layer.sparse_indices["default"], start)
        if t == warmup:
            assert not torch.equal(layer.sparse_indices["default"], start)  # the mask, chosen once
            mask = layer.sparse_indices["default"].clone()
        if t > warmup:
            assert torch.equal(layer.sparse_indices["default"], mask) and float(values.abs().sum()) > 0
    assert not torch.equal(layer.sparse_lora_B["default"], b_start)


def test_a_run_shorter_than_the_warm_up_is_refused_and_an_unknown_length_warned():
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="rosa", warmup_steps=20))
    with pytest.raises(ValueError, match="the run has 10 optimizer steps, fewer than RoSA's warmup_steps=20"):
        SparseScheduler(model, None, total_steps=10)
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="rosa", warmup_steps=20))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = _batches(1)[0]
    model(x, labels=x).loss.backward()
    with pytest.warns(UserWarning, match="RoSA chooses its sparse mask after 20 optimizer steps"):
        opt.step()  # a plain loop that gave no length: told at its first step


def test_resuming_in_the_warm_up_chooses_the_same_mask(tmp_path):
    full, resumed = trainer_run_and_resume(
        tmp_path, lambda: SparseConfig(method="rosa", target_modules="all-linear", warmup_steps=4),
        examples=32, max_steps=6, save_steps=2,
    )
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-6), key


def test_the_card_and_the_file_say_how_the_mask_was_chosen(tmp_path):
    model = get_peft_model(tiny_llama(), SparseConfig(method="rosa", warmup_steps=5, inference_mode=False))
    model.save_pretrained(tmp_path)
    assert "top-k of Σ g² over the first 5 optimizer steps" in (tmp_path / "README.md").read_text()
    assert '"warmup_steps": 5' in (tmp_path / "adapter_config.json").read_text()
    assert copy.deepcopy(model.peft_config["default"]).method_config["pool"] == 4.0
