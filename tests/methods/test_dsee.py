"""DSEE: low-rank plus sparse update on the residual of a low-rank fit, and pruning of the merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer
from sparse_peft.selection import lowrank_residual, select

from ..conftest import tiny_llama


def _adapted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def test_residual_support_finds_the_spikes_a_low_rank_fit_leaves():
    # W = rank-4 part + 20 large spikes + small noise: the spikes are the sparse part DSEE looks for.
    # Plain magnitude would pick entries of the large low-rank part instead.
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g)
    spikes = torch.randperm(64 * 48, generator=g)[:20].sort().values
    w = 3 * u @ v + 0.01 * torch.randn(64, 48, generator=g)
    w.view(-1)[spikes] += 2.0 * torch.sign(torch.randn(20, generator=g))
    chosen = select("lowrank_residual", "unstructured", 20, (64, 48), 0, lambda: w, residual_rank=4)
    assert torch.equal(chosen, spikes)
    assert not torch.equal(select("magnitude", "unstructured", 20, (64, 48), 0, lambda: w), spikes)


def test_residual_scores_match_an_exact_truncated_svd():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(w.double())
    exact = (w.double() - (u[:, :6] * s[:6]) @ vh[:6]).abs()
    # a randomized SVD with power iterations is accurate on a small matrix, not exact
    assert torch.allclose(lowrank_residual(w, 6).double(), exact, atol=0.05)
    state = torch.random.get_rng_state()
    lowrank_residual(w, 6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the user's RNG stream is untouched


def test_forward_and_gradients_equal_dense_math_with_the_sparse_part_scaled():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10)).double()
    config = SparseConfig(method="dsee", target_modules=["0"], density=0.1, r=2, lora_alpha=6, init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    layer = _adapted(model)["base_model.model.0"]
    values, idx = layer.sparse_values["default"], layer.sparse_indices["default"].long()
    a, b = layer.sparse_lora_A["default"], layer.sparse_lora_B["default"]
    x = torch.randn(5, 12, dtype=torch.float64)
    dy = torch.randn(5, 10, dtype=torch.float64)
    y = model(x)
    (y * dy).sum().backward()

    # reference: the same trainable tensors, dense, in float64
    v, A, B = (t.detach().clone().requires_grad_(True) for t in (values, a, b))
    s = 6 / 2
    sparse = torch.zeros(120, dtype=torch.float64).index_put((idx,), v).view(10, 12)
    w = base[0].weight + s * B @ A + s * sparse
    y_ref = x @ w.T + base[0].bias
    (y_ref * dy).sum().backward()
    assert torch.allclose(y, y_ref)
    for got, ref in ((values, v), (a, A), (b, B)):
        assert torch.allclose(got.grad, ref.grad)
    merged = model.merge_and_unload()
    assert torch.allclose(merged[0].weight, w.detach())


def test_dsee_preset_trains_saves_and_reloads():
    x = torch.randint(0, 128, (2, 9))
    model = get_peft_model(tiny_llama(), SparseConfig(method="dsee", target_modules="all-linear", init_weights=False))
    for layer in _adapted(model).values():
        assert layer.sparse_part_scale["default"] == 2.0  # lora_alpha 16 / r 8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        assert torch.equal(loaded(x).logits, model(x).logits)


def _trained_llama():
    model = get_peft_model(tiny_llama(), SparseConfig(method="dsee", target_modules="all-linear", init_weights=False))
    return model


def test_unstructured_pruning_reaches_the_sparsity_and_keeps_the_largest_merged_weights():
    model = _trained_llama()
    layers = _adapted(model)
    merged = {n: (m.get_base_layer().weight + m.get_delta("default").dense()).detach().clone() for n, m in layers.items()}
    pruned, report = sparse_peft.prune(model, sparsity=0.5)
    pooled = torch.cat([w.abs().reshape(-1) for w in merged.values()])
    cut = pooled.kthvalue(int(0.5 * pooled.numel())).values
    assert report.zeros == int(0.5 * pooled.numel()) and abs(report.sparsity - 0.5) < 1e-3
    for name, w in merged.items():
        module = pruned.get_submodule(name.removeprefix("base_model.model."))
        assert type(module) is nn.Linear
        kept = module.weight != 0
        assert torch.allclose(module.weight[kept], w[kept], atol=1e-6)  # survivors: the merged weights
        assert bool((w[~kept].abs() <= cut).all()) and bool((w[kept].abs() >= cut).all())


def test_delta_score_prunes_what_fine_tuning_changed_least():
    model = _trained_llama()
    layers = _adapted(model)
    deltas = {n: m.get_delta("default").dense().detach().abs() for n, m in layers.items()}
    pruned, report = sparse_peft.prune(model, sparsity=0.3, score="delta")
    pooled = torch.cat([d.reshape(-1) for d in deltas.values()])
    cut = pooled.kthvalue(int(0.3 * pooled.numel())).values
    for name, d in deltas.items():
        zero = pruned.get_submodule(name.removeprefix("base_model.model.")).weight == 0
        assert bool((d[zero] <= cut).all())


def test_head_pruning_zeroes_the_least_updated_heads_with_grouped_query_attention():
    model = _trained_llama()  # 4 query heads of size 8 reading 2 key/value heads
    layers = _adapted(model)
    expected = {}
    for name, layer in layers.items():
        if name.endswith("o_proj"):
            o = layer.get_delta("default").dense().detach().abs()
            v = layers[name.replace("o_proj", "v_proj")].get_delta("default").dense().detach().abs()
            score = [o[:, 8 * h : 8 * h + 8].sum() + v[8 * (h // 2) : 8 * (h // 2) + 8].sum() for h in range(4)]
            expected[name] = sorted(torch.tensor(score).argsort()[:1].tolist())
    pruned, report = sparse_peft.prune(model, heads_per_layer=1)
    assert report.heads == expected
    for name, heads in expected.items():
        w = pruned.get_submodule(name.removeprefix("base_model.model.")).weight
        for h in range(4):
            assert bool((w[:, 8 * h : 8 * h + 8] == 0).all()) == (h in heads)
    assert report.sparsity == pytest.approx(0.25)


def test_prune_refuses_unclear_requests():
    model = _trained_llama()
    with pytest.raises(ValueError, match="one of sparsity"):
        sparse_peft.prune(model)
    with pytest.raises(ValueError, match="score="):
        sparse_peft.prune(model, sparsity=0.5, score="abs")
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        sparse_peft.prune(model, sparsity=1.5)
    assert _adapted(model)  # refused before anything was merged


def test_config_refuses_residual_rule_on_structured_supports():
    with pytest.raises(ValueError, match="lowrank_residual"):
        SparseConfig(selection="lowrank_residual", structure="columns")
    with pytest.raises(ValueError, match="residual_rank"):
        SparseConfig(method="dsee", residual_rank=0)


def _tied_llama():
    # merged weights with many exact ties: a coarse grid, and a zero update
    base = tiny_llama()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.round(p * 8) / 8)
    return get_peft_model(base, SparseConfig(method="dsee", target_modules="all-linear"))


@pytest.mark.parametrize("score", ["merged", "delta"])
def test_pruning_removes_exactly_k_weights_ties_first_in_layer_order(score):
    model = _tied_llama()  # delta: ΔW is zero everywhere, one big tie
    layers = _adapted(model)
    merged = {n: (m.get_base_layer().weight + m.get_delta("default").dense()).detach().reshape(-1) for n, m in layers.items()}
    scores = {n: (m.get_delta("default").dense().detach().abs().reshape(-1) if score == "delta" else merged[n].abs())
              for n, m in layers.items()}
    pooled = torch.cat(list(scores.values()))
    k = int(0.4 * pooled.numel())
    assert int((pooled == pooled.kthvalue(k).values).sum()) > 1  # the cut falls on a tie
    # the reference: a stable sort of the pooled scores, layer by layer, keeps the first k
    drop = torch.zeros(pooled.numel(), dtype=torch.bool)
    drop[torch.sort(pooled, stable=True).indices[:k]] = True
    pruned, report = sparse_peft.prune(model, sparsity=0.4, score=score)
    start = 0
    for name, s in scores.items():
        w = pruned.get_submodule(name.removeprefix("base_model.model.")).weight.reshape(-1)
        expected = drop[start : start + s.numel()]
        start += s.numel()
        assert torch.equal(w == 0, expected | (merged[name] == 0)), name  # weights already zero stay zero


def test_pruning_holds_one_layers_scores_at_a_time():
    from ..largest import LargestCreated

    model = _trained_llama()
    biggest = max(m.get_base_layer().weight.numel() for m in _adapted(model).values())
    with LargestCreated([*model.parameters(), *model.buffers()]) as seen:
        sparse_peft.prune(model, sparsity=0.5)
    assert seen.most(floating=False)[0] <= biggest  # no pooled copy of all the layers' scores


def test_pruning_gpt2_conv1d_layers_with_ties():
    # Conv1D weights are (in × out): seen through a transposed view; the cut must still be exact
    from ..conftest import tiny_gpt2

    base = tiny_gpt2()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.round(p * 256) / 256)  # init std 0.02: about 5 steps of the grid, many ties
    model = get_peft_model(base, SparseConfig(method="dsee", target_modules=["c_attn", "c_fc"]))
    weights = [m.get_base_layer().weight for m in _adapted(model).values()]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) < 0.4 * total  # the zeros alone do not reach the cut
    pruned, report = sparse_peft.prune(model, sparsity=0.4)
    assert report.total == total and report.zeros == int(0.4 * total)
