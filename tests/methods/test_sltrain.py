"""SLTrain: low-rank plus a fixed random sparse part whose support files never store."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer, pretraining
from sparse_peft.prng import seed_for, seeded_subset

from ..conftest import tiny_llama


def _adapted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def test_adapter_file_holds_values_only_and_the_support_comes_back_from_the_seed():
    x = torch.randint(0, 128, (2, 9))
    model = get_peft_model(tiny_llama(), SparseConfig(method="sltrain", target_modules="all-linear", init_weights=False))
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        keys = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert keys and not any("indices" in k for k in keys)
        assert any(k.endswith("sparse_values") for k in keys)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            assert json.load(f)["store_indices"] is False
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        assert torch.equal(loaded(x).logits, model(x).logits)
        for name, layer in _adapted(loaded).items():
            assert torch.equal(layer.sparse_indices["default"], _adapted(model)[name].sparse_indices["default"])


def test_support_is_the_portable_draw_and_pinned():
    model = get_peft_model(tiny_llama(), SparseConfig(method="sltrain", target_modules=["q_proj"], seed=7))
    layer = _adapted(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    expected = seeded_subset(32 * 32, round(0.03 * 32 * 32), seed_for(7, "model.layers.0.self_attn.q_proj"))
    assert torch.equal(layer.sparse_indices["default"].long(), expected)
    # pinned: a change of generator, seed derivation or module key would silently move every saved adapter's support
    assert layer.sparse_indices["default"][:6].tolist() == [18, 22, 35, 44, 179, 183]


def test_gradients_equal_dense_math():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10)).double()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="sltrain", target_modules=["0"], density=0.2, r=2,
                                                             lora_alpha=4, init_weights=False))
    layer = _adapted(model)["base_model.model.0"]
    values, idx = layer.sparse_values["default"], layer.sparse_indices["default"].long()
    a, b = layer.sparse_lora_A["default"], layer.sparse_lora_B["default"]
    x, dy = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    y = model(x)
    (y * dy).sum().backward()
    v, A, B = (t.detach().clone().requires_grad_(True) for t in (values, a, b))
    w = base[0].weight + 2.0 * B @ A + torch.zeros(120, dtype=torch.float64).index_put((idx,), v).view(10, 12)
    y_ref = x @ w.T + base[0].bias
    (y_ref * dy).sum().backward()
    assert torch.allclose(y, y_ref)
    for got, ref in ((values, v), (a, A), (b, B)):
        assert torch.allclose(got.grad, ref.grad)
    assert torch.allclose(model.merge_and_unload()[0].weight, w.detach())


def _fresh_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_pretraining_mode_replaces_the_linears_trains_saves_loads_and_densifies():
    model = pretraining.convert(_fresh_llama(), rank=4, density=0.1, alpha=8, seed=3)
    replaced = [m for m in model.modules() if isinstance(m, pretraining.SLTrainLinear)]
    assert len(replaced) == 14 and not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert type(model.lm_head) is nn.Linear  # the output head stays dense, as in the paper
    # SLTrain's initialisation: B = 0, so each layer starts as its sparse part alone
    layer = replaced[0]
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert float(layer.values.abs().max()) <= 1 / layer.in_features**0.5
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        assert not any("indices" in k for k in load_file(os.path.join(folder, "model.safetensors")))
        loaded = pretraining.from_pretrained(folder)
        assert torch.equal(loaded(x).logits, model(x).logits)
        dense = pretraining.densify(loaded)
        assert not any(isinstance(m, pretraining.SLTrainLinear) for m in dense.modules())
        assert torch.allclose(dense(x).logits, model(x).logits, atol=1e-5)
        # a densified model is a plain transformers model again
        dense.save_pretrained(folder + "/dense")
        from transformers import LlamaForCausalLM

        again = LlamaForCausalLM.from_pretrained(folder + "/dense")
        assert torch.allclose(again(x).logits, model(x).logits, atol=1e-5)


def test_pretraining_layer_never_keeps_a_dense_weight_for_backward():
    layer = pretraining.SLTrainLinear(64, 48, rank=4, density=0.05, alpha=8, seed=0)
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    # storage, not numel: the zero base the op adds to is an expanded scalar (4 bytes)
    assert not any(t.untyped_storage().nbytes() >= 64 * 48 * 4 for t in saved)
    # the sparse part's gradient is the dense weight gradient at the support
    dense_grad = torch.ones(32, 48).T @ x.detach()
    rows, cols = layer.indices.long() // 64, layer.indices.long() % 64
    assert torch.allclose(layer.values.grad, dense_grad[rows, cols], atol=1e-5)


def test_loading_refuses_a_mismatched_checkpoint():
    model = pretraining.convert(_fresh_llama(), rank=4, density=0.1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        config["sltrain"]["density"] = 0.2  # another support size than the file's values
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match="shape"):
            pretraining.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as folder:
        _fresh_llama().save_pretrained(folder)
        with pytest.raises(ValueError, match="no SLTrain model"):
            pretraining.from_pretrained(folder)


def test_store_indices_false_needs_a_random_support():
    with pytest.raises(ValueError, match="store_indices=False"):
        SparseConfig(method="sltrain", selection="magnitude")


@pytest.mark.parametrize("tokens", [1, 32])  # 1: the few-token gather; 32: one GEMM on the scratch weight
def test_pretraining_layer_matches_dense_math_in_float64(tokens):
    torch.manual_seed(0)
    layer = pretraining.SLTrainLinear(64, 48, rank=4, density=0.05, alpha=8, seed=3).double()
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero: give the low-rank part a value
    mode = sparse_peft.ops.product_mode(tokens, layer.values.numel(), 48, 64)
    assert mode == ("gather" if tokens == 1 else "dense")
    x = torch.randn(tokens, 64, dtype=torch.float64, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.values, layer.bias]
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    a, b, v, bias = refs
    rows, cols = layer.indices.long() // 64, layer.indices.long() % 64
    s = torch.zeros(48, 64, dtype=torch.float64).index_put((rows, cols), v)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ (layer.scaling * b @ a + s).t() + bias
    y = layer(x)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for p, r in zip([x, *params], [x_ref, *refs]):
        torch.testing.assert_close(p.grad, r.grad)
