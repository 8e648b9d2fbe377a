"""S²FT: heads and FFN channels as column blocks of the output projections, partial backprop."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer

from ..conftest import tiny_gpt2, tiny_llama


def _adapted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def test_llama_with_grouped_query_attention_trains_whole_heads_and_channels():
    base = tiny_llama()  # 4 query heads of 8, 2 key/value heads
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", module_density={"o_proj": 0.5}))
    layers = _adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"o_proj", "down_proj"}
    for name, layer in layers.items():
        cols = layer.sparse_col_index["default"].long()
        if name.endswith("o_proj"):
            heads = cols.reshape(-1, 8)  # head_dim = 32 / 4
            assert heads.shape[0] == 2  # half of the 4 heads
            assert torch.equal(heads, heads[:, :1] + torch.arange(8)) and bool((heads[:, 0] % 8 == 0).all())
        else:
            assert cols.numel() == round(0.05 * 64)
    x = torch.randint(0, 128, (2, 9))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("factory, attn, down", [(tiny_gpt2, "attn.c_proj", "mlp.c_proj")])
def test_gpt2_heads_live_in_its_conv1d_projection(factory, attn, down):
    model = get_peft_model(factory(), SparseConfig(method="s2ft", density=0.5))
    layers = _adapted(model)
    assert {n.split(".h.")[1].split(".", 1)[1] for n in layers} == {attn, down}
    for name, layer in layers.items():
        cols = layer.sparse_col_index["default"].long()
        if name.endswith(attn):
            assert bool((cols.reshape(-1, 8)[:, 0] % 8 == 0).all())


def test_opt_is_mapped():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    base = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100, word_embed_proj_dim=32))
    model = get_peft_model(base, SparseConfig(method="s2ft"))
    assert {n.rsplit(".", 1)[-1] for n in _adapted(model)} == {"out_proj", "fc2"}


def test_an_unmapped_architecture_is_refused_with_the_fix():
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="model_type='bert'.*pass target_modules explicitly"):
        get_peft_model(base, SparseConfig(method="s2ft"))


def test_gradients_equal_dense_training_of_the_selected_columns_in_float64():
    base = tiny_llama().double()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", init_weights=False, density=0.25), autocast_adapter_dtype=False)
    x = torch.randint(0, 128, (2, 9))
    model(x, labels=x).loss.backward()
    # the reference: ordinary full training of the merged weights, restricted to the selected columns
    reference = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    reference(x, labels=x).loss.backward()
    for name, layer in _adapted(model).items():
        weight = reference.get_submodule(name.removeprefix("base_model.model.")).weight
        cols = layer.sparse_col_index["default"].long()
        assert torch.allclose(layer.sparse_col_block["default"].grad, weight.grad[:, cols], atol=1e-10), name


def test_a_down_projection_keeps_only_its_selected_columns():
    model = get_peft_model(tiny_llama(), SparseConfig(method="s2ft", density=0.25))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 7, 64, requires_grad=True)
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in {p.untyped_storage().data_ptr() for p in [*layer.parameters(), *layer.buffers()]}:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    selected = layer.sparse_col_index["default"].numel()
    assert sum(kept.values()) == 3 * 7 * selected * x.element_size()


def test_disjoint_adapters_fuse_and_switch():
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", density=0.25, init_weights=False))
    model.add_adapter("second", SparseConfig(method="s2ft", density=0.25, init_weights=False, seed=0, disjoint_from=["default"]))
    for layer in _adapted(model).values():
        first, second = (set(layer.sparse_col_index[n].tolist()) for n in ("default", "second"))
        assert first and second and not first & second
    outs = {}
    for active in (["default"], ["second"], ["default", "second"]):
        model.base_model.set_adapter(active)
        outs[tuple(active)] = model(x).logits
    # switching back and forth is exact
    model.set_adapter("default")
    assert torch.equal(model(x).logits, outs[("default",)])
    # fused: merging both into the weights equals running both, and each keeps its own columns
    model.base_model.set_adapter(["default", "second"])
    model.merge_adapter(["default", "second"])
    assert torch.allclose(model(x).logits, outs[("default", "second")], atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        assert torch.allclose(model(x).logits, base(x).logits, atol=1e-5)


def test_head_groups_need_columns():
    with pytest.raises(ValueError, match="head_groups"):
        SparseConfig(method="s2ft", structure="rows")


def _reference_norms(base, names, batches):
    """Input-feature norms recorded independently, on the plain base model."""
    sums = {}
    handles = [
        base.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: sums.__setitem__(n, sums.get(n, 0) + args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            base(b)
    for h in handles:
        h.remove()
    return {n: v.sqrt() for n, v in sums.items()}


def test_small_activation_selection_picks_the_quietest_heads_and_channels(tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    batches = [torch.randint(0, 128, (2, 12)) for _ in range(3)]
    config = SparseConfig(method="s2ft", selection="small_activation", module_density={"o_proj": 0.5}, density=0.25)
    model = get_peft_model(copy.deepcopy(base), config)
    x = torch.randint(0, 128, (2, 9))
    with pytest.raises(RuntimeError, match="sparse_peft.calibrate"):
        model.train()(x, labels=x).loss.backward()
    assert sparse_peft.calibrate(model, batches, progress=False) == 3 * 2 * 12
    layers = {n.removeprefix("base_model.model."): m for n, m in _adapted(model).items()}
    norms = _reference_norms(base, layers, batches)
    for name, layer in layers.items():
        chosen = layer.sparse_col_index["default"].long()
        if name.endswith("o_proj"):  # whole heads of 8 columns: the 2 of 4 with the smallest norm
            head_norms = norms[name].reshape(4, 8).norm(dim=1)
            expected = head_norms.topk(2, largest=False).indices.sort().values
            assert chosen.reshape(-1, 8)[:, 0].div(8, rounding_mode="floor").tolist() == expected.tolist()
        else:
            expected = norms[name].topk(chosen.numel(), largest=False).indices.sort().values
            assert chosen.tolist() == expected.tolist()
    model(x, labels=x).loss.backward()  # calibrated: trains
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    loaded.train()(x, labels=x).loss.backward()  # the file's support needs no calibration


def test_weight_activation_on_single_entries_is_wandas_score():
    from ..conftest import MLP

    base = MLP()
    batches = [torch.randn(8, 10) * torch.linspace(0.1, 4, 10) for _ in range(2)]
    model = get_peft_model(copy.deepcopy(base), SparseConfig(target_modules=["lin0"], selection="weight_activation", density=0.1))
    sparse_peft.calibrate(model, batches, progress=False)
    norms = _reference_norms(base, ["lin0"], batches)["lin0"]
    score = (base.lin0.weight.abs() * norms[None, :]).reshape(-1)
    expected = score.topk(20).indices.sort().values
    assert model.base_model.model.lin0.sparse_indices["default"].long().tolist() == expected.tolist()


def test_activation_rules_refuse_structures_they_cannot_score():
    with pytest.raises(ValueError, match="scores input columns"):
        SparseConfig(selection="activation", structure="rows")
    with pytest.raises(ValueError, match="weight_activation"):
        SparseConfig(selection="small_activation", structure="unstructured")


# -- gradient selection (S²FT-G), global allocation, coupled rows (issue #4) ---------------------------


def _llama(layers=2, kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _labelled(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=(ids := torch.randint(0, 128, (2, 10), generator=g)), labels=ids) for _ in range(n)]


def _index(model, key):
    """{module name in the base model: that layer's column or row indices} for one adapter."""
    found = {}
    for name, layer in _adapted(model).items():
        store = getattr(layer, key)
        if "default" in store:
            found[name.removeprefix("base_model.model.")] = store["default"].long()
    return found


def _reference_gradient_norms(base, names, batches):
    """sqrt(Σ_b ‖∂L_b/∂W[:, c]‖²) by ordinary dense autograd of the whole weights, batch by batch."""
    ref = copy.deepcopy(base)
    squares = {}
    for batch in batches:
        ref.zero_grad()
        for n in names:
            ref.get_submodule(n).weight.requires_grad_(True)
        ref(**batch).loss.backward()
        for n in names:
            squares[n] = squares.get(n, 0) + ref.get_submodule(n).weight.grad.pow(2).sum(0)
    return {n: v.sqrt() for n, v in squares.items()}


def test_gradient_selection_scores_columns_by_the_norm_of_their_weight_gradient():
    base = _llama().double()
    batches = _labelled(2)
    config = dict(method="s2ft", module_density={"o_proj": 0.5}, density=0.25)
    model = get_peft_model(
        copy.deepcopy(base), SparseConfig(**config, selection="gradient"), autocast_adapter_dtype=False
    )
    scores, tokens = sparse_peft.calibration.calibration_statistics(model, batches, progress=False)
    reference = _reference_gradient_norms(base, scores, batches)
    assert tokens == 2 * 2 * 10 and set(scores) == set(reference) and len(scores) == 4
    for name in scores:
        assert torch.allclose(scores[name], reference[name], rtol=1e-10, atol=1e-14), name
    # nothing was trained or accumulated on the way: no .grad anywhere, the base still frozen
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "sparse_" not in n)

    for rule, model in (
        ("gradient", model),
        ("small_gradient", get_peft_model(copy.deepcopy(base), SparseConfig(**config, selection="small_gradient"))),
    ):
        sparse_peft.calibrate(model, batches, progress=False)
        largest = rule == "gradient"
        for name, cols in _index(model, "sparse_col_index").items():
            if name.endswith("o_proj"):  # heads of 8 columns, scored by the norm of their block
                heads = reference[name].reshape(4, 8).norm(dim=1).topk(2, largest=largest).indices.sort().values
                expected = (heads[:, None] * 8 + torch.arange(8)).reshape(-1)
            else:
                expected = reference[name].topk(cols.numel(), largest=largest).indices.sort().values
            assert cols.tolist() == expected.tolist(), (rule, name)
    x = batches[0]["input_ids"]
    model.train()(x, labels=x).loss.backward()  # calibrated: trains


def test_gradient_selection_needs_labels_and_says_so():
    model = get_peft_model(_llama(), SparseConfig(method="s2ft", selection="gradient"))
    with pytest.raises(ValueError, match="labels"):
        sparse_peft.calibrate(model, [dict(input_ids=torch.randint(0, 128, (2, 8)))], progress=False)
    with pytest.raises(ValueError, match="labels"):
        sparse_peft.calibrate(model, [torch.randint(0, 128, (2, 8))], progress=False)


def _counts(model, key="sparse_col_index"):
    counts = {}
    for name, idx in _index(model, key).items():
        counts.setdefault(name.rsplit(".", 1)[-1], []).append(idx.numel())
    return counts


def test_global_allocation_keeps_the_total_and_varies_by_layer_deterministically():
    base = _llama(layers=4)
    config = dict(method="s2ft", module_density={"o_proj": 0.5}, density=0.25)
    uniform = get_peft_model(copy.deepcopy(base), SparseConfig(**config))
    pooled = get_peft_model(copy.deepcopy(base), SparseConfig(**config, allocation="global"))
    again = get_peft_model(copy.deepcopy(base), SparseConfig(**config, allocation="global"))
    other = get_peft_model(copy.deepcopy(base), SparseConfig(**config, allocation="global", seed=1))
    assert _counts(uniform) == {"o_proj": [16] * 4, "down_proj": [16] * 4}
    counts = _counts(pooled)
    assert sum(counts["o_proj"]) == 64 and sum(counts["down_proj"]) == 64
    assert len(set(counts["down_proj"])) > 1  # each layer's count varies
    assert all(c % 8 == 0 for c in counts["o_proj"])  # still whole heads
    first, second = _index(pooled, "sparse_col_index"), _index(again, "sparse_col_index")
    assert all(torch.equal(first[n], second[n]) for n in first)  # the same seed, the same draw
    assert any(not torch.equal(first[n], idx) for n, idx in _index(other, "sparse_col_index").items())


def test_global_allocation_rounds_the_pool_once_not_every_layer():
    # o_proj's share is 0.3 heads per layer: uniform gives every layer one head (4 heads, 13x its share), the pool
    # rounds 4 x 0.3 = 1.2 heads once: one head, in one of the layers
    base = _llama(layers=4)
    config = dict(method="s2ft", module_density={"o_proj": 0.3 * 8 / 32}, density=0.25)
    uniform = _counts(get_peft_model(copy.deepcopy(base), SparseConfig(**config)))
    pooled = _counts(get_peft_model(copy.deepcopy(base), SparseConfig(**config, allocation="global")))
    assert uniform["o_proj"] == [8] * 4
    assert sorted(pooled["o_proj"]) == [0, 0, 0, 8]
    assert sum(pooled["down_proj"]) == sum(uniform["down_proj"])


def test_global_pools_keep_one_total_over_the_roles():
    # num_trainable=1000 on 4 layers: o_proj's pool is 1.3 heads, rounded to one (77 parameters short); the FFN pool,
    # rounded after it, makes them up (23 columns rather than its own 20.8 -> 21), so the total is the one asked to
    # within half a column, where rounding each role alone trains 928 (-7%)
    base = _llama(layers=4)
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", num_trainable=1000, allocation="global"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = _counts(model)
    assert sum(counts["o_proj"]) == 8  # one whole head
    assert abs(trained - 1000) <= 32 // 2 and sum(counts["down_proj"]) == 23


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_a_missed_total_is_reported_as_trained(allocation):
    # the count in the warning is what trains once the supports are chosen, pooled ones included
    import re
    import warnings

    base = _llama(layers=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", num_trainable=1500, allocation=allocation))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    said = [w for w in caught if "num_trainable=1,500 was asked" in str(w.message)]
    # one head per layer of o_proj makes uniform miss by far; the pool rounds once and lands close
    assert (abs(trained - 1500) > 75) == (allocation == "uniform") == (len(said) == 1)
    if said:
        assert int(re.search(r"but ([\d,]+) sparse", str(said[0].message)).group(1).replace(",", "")) == trained
        assert "allocation='global'" in str(said[0].message)


def test_global_magnitude_picks_the_largest_columns_of_all_layers_together():
    base = _llama(layers=3)
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", selection="magnitude", density=0.25,
                                                             module_density={"o_proj": 0.5}, allocation="global"))
    chosen = _index(model, "sparse_col_index")
    for suffix, group, total in (("down_proj", 1, 3 * 16), ("o_proj", 8, 3 * 16)):
        names = [f"model.layers.{i}.{'mlp' if suffix == 'down_proj' else 'self_attn'}.{suffix}" for i in range(3)]
        norms = torch.cat([base.get_submodule(n).weight.norm(dim=0).reshape(-1, group).norm(dim=1) for n in names])
        top = norms.topk(total // group).indices
        units_per_layer = norms.numel() // 3
        for i, name in enumerate(names):
            units = top[top // units_per_layer == i] % units_per_layer
            expected = (units.sort().values[:, None] * group + torch.arange(group)).reshape(-1)
            assert chosen[name].tolist() == expected.tolist(), name


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head, then grouped-query (2 query heads per value head)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_coupled_rows_are_the_units_chosen_on_down_and_o(kv_heads, allocation):
    base = _llama(layers=3, kv_heads=kv_heads)
    config = SparseConfig(method="s2ft", density=0.25, module_density={"o_proj": 0.5}, allocation=allocation,
                          coupled_rows=["ffn_up", "value"])
    model = get_peft_model(copy.deepcopy(base), config)
    cols, rows = _index(model, "sparse_col_index"), _index(model, "sparse_row_index")
    assert len(cols) == 6 and len(rows) == 9
    for i in range(3):
        down = cols[f"model.layers.{i}.mlp.down_proj"]
        assert torch.equal(rows[f"model.layers.{i}.mlp.up_proj"], down)
        assert torch.equal(rows[f"model.layers.{i}.mlp.gate_proj"], down)
        heads = cols[f"model.layers.{i}.self_attn.o_proj"].reshape(-1, 8)[:, 0] // 8
        kv = (heads // (4 // kv_heads)).unique()
        expected = (kv[:, None] * 8 + torch.arange(8)).reshape(-1)
        assert rows[f"model.layers.{i}.self_attn.v_proj"].tolist() == expected.tolist()
        if kv_heads == 4:  # one value head per query head: the same indices as o_proj's columns
            assert torch.equal(rows[f"model.layers.{i}.self_attn.v_proj"], cols[f"model.layers.{i}.self_attn.o_proj"])


def test_coupled_rows_follow_a_calibrated_selection():
    base = _llama()
    batches = _labelled()
    config = SparseConfig(method="s2ft", selection="small_gradient", density=0.25, coupled_rows="ffn_up")
    model = get_peft_model(copy.deepcopy(base), config)
    x = batches[0]["input_ids"]
    with pytest.raises(RuntimeError, match="sparse_peft.calibrate"):  # the rows wait for their partner
        model.base_model.model.model.layers[0].mlp.up_proj.train()(torch.randn(2, 32))
    sparse_peft.calibrate(model, batches, progress=False)
    cols, rows = _index(model, "sparse_col_index"), _index(model, "sparse_row_index")
    for i in range(2):
        assert torch.equal(rows[f"model.layers.{i}.mlp.up_proj"], cols[f"model.layers.{i}.mlp.down_proj"])
    model.train()(x, labels=x).loss.backward()


def test_coupled_rows_on_gpt2_conv1d():
    model = get_peft_model(tiny_gpt2(), SparseConfig(method="s2ft", density=0.25, coupled_rows=["ffn_up"]))
    cols, rows = _index(model, "sparse_col_index"), _index(model, "sparse_row_index")
    assert set(rows) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    for name, idx in rows.items():
        assert torch.equal(idx, cols[name.replace("c_fc", "c_proj")])
    with pytest.raises(ValueError, match="no separate value projection"):
        get_peft_model(tiny_gpt2(), SparseConfig(method="s2ft", coupled_rows=["value"]))


def test_coupled_row_gradients_equal_dense_masked_training_in_float64():
    base = _llama().double()
    config = SparseConfig(method="s2ft", init_weights=False, density=0.25, module_density={"o_proj": 0.5},
                          allocation="global", coupled_rows=["ffn_up", "value"])
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    assert assert_gradients_equal_dense(model, torch.randint(0, 128, (2, 9))) == 10


def assert_gradients_equal_dense(model, x) -> int:
    """float64: every trained block's gradient is that of dense training of the merged weight at its
    columns (or rows), the reference being ordinary autograd on a merged copy. Returns the layers checked."""
    model(x, labels=x).loss.backward()
    reference = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    reference(x, labels=x).loss.backward()
    checked = 0
    for name, layer in _adapted(model).items():
        weight = reference.get_submodule(name.removeprefix("base_model.model.")).weight
        if "default" in layer.sparse_row_index:
            rows = layer.sparse_row_index["default"].long()
            assert torch.allclose(layer.sparse_row_block["default"].grad, weight.grad[rows], atol=1e-10), name
        else:
            cols = layer.sparse_col_index["default"].long()
            assert torch.allclose(layer.sparse_col_block["default"].grad, weight.grad[:, cols], atol=1e-10), name
        checked += 1
    return checked


def test_per_layer_sizes_survive_save_and_load(tmp_path):
    from peft import PeftModel

    base = _llama(layers=3)
    batches = _labelled()
    config = SparseConfig(method="s2ft", selection="gradient", density=0.25, module_density={"o_proj": 0.25},
                          allocation="global", coupled_rows=["ffn_up", "value"], init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    sparse_peft.calibrate(model, batches, progress=False)
    sizes = {n: idx.numel() for n, idx in _index(model, "sparse_col_index").items()}
    assert len({s for n, s in sizes.items() if n.endswith("down_proj")}) > 1
    assert 0 in {s for n, s in sizes.items() if n.endswith("o_proj")}  # 3 heads over 3 layers: one goes empty
    x = torch.randint(0, 128, (2, 9))
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    for low_cpu_mem_usage in (False, True):
        # a fresh injection has uniform placeholders; the file's sizes replace them
        loaded = PeftModel.from_pretrained(
            copy.deepcopy(base), tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
        )
        for key in ("sparse_col_index", "sparse_row_index"):
            saved, back = _index(model, key), _index(loaded, key)
            assert saved.keys() == back.keys() and all(torch.equal(saved[n], back[n]) for n in saved)
        assert torch.allclose(loaded(x).logits, expected, atol=1e-6)
        loaded.train()(x, labels=x).loss.backward()  # the file's support needs no calibration


def test_merge_and_unmerge_are_exact():
    base = _llama()
    with torch.no_grad():  # dyadic weights and updates: W + Δ - Δ is exact in float32
        for p in base.parameters():
            p.copy_((p * 2**12).round() / 2**12)
    config = SparseConfig(
        method="s2ft", init_weights=False, density=0.25, allocation="global", coupled_rows=["ffn_up", "value"]
    )
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sparse_" in name:
                p.copy_((p * 2**8).round() / 2**8)
    x = torch.randint(0, 128, (2, 9))
    unmerged = model(x).logits
    layers = {n.removeprefix("base_model.model."): m for n, m in _adapted(model).items()}
    model.merge_adapter()
    for name, layer in layers.items():
        expected = base.get_submodule(name).weight + layer.get_delta_weight("default")
        assert torch.equal(layer.get_base_layer().weight, expected), name
    assert torch.allclose(model(x).logits, unmerged, atol=1e-5)
    model.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, base.get_submodule(name).weight), name
    assert torch.equal(model(x).logits, unmerged)


def test_s2ft_is_complete_and_new_fields_refuse_bad_values():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseConfig(method="s2ft")  # no "incomplete" warning any more
    with pytest.raises(ValueError, match="allocation='global' pools whole rows or columns"):
        SparseConfig(allocation="global", structure="unstructured")
    with pytest.raises(ValueError, match="allocation="):
        SparseConfig(method="s2ft", allocation="per-layer")
    with pytest.raises(ValueError, match="unknown roles"):
        SparseConfig(method="s2ft", coupled_rows=["up_proj"])
    with pytest.raises(ValueError, match="coupled_rows .*structure='columns'"):
        SparseConfig(coupled_rows=["ffn_up"], structure="rows")
    with pytest.raises(ValueError, match="weight gradient: use structure='columns'"):
        SparseConfig(selection="gradient", structure="unstructured")
    # a coupled row module whose partner is not adapted
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.*add it to target_modules"):
        get_peft_model(_llama(), SparseConfig(method="s2ft", target_modules=["o_proj"], coupled_rows=["ffn_up"]))


def test_under_torch_distributed_calibration_sums_over_ranks(tmp_path):
    # One gloo rank in this process: the all-reduce path runs (each rank would then hold the sum of
    # all ranks' statistics and choose alike) and gives what a plain process gives.
    import torch.distributed as dist

    def indices():
        config = SparseConfig(
            method="s2ft", selection="gradient", density=0.25, allocation="global", coupled_rows=["ffn_up"]
        )
        model = get_peft_model(_llama(layers=3), config)
        sparse_peft.calibrate(model, _labelled(2), progress=False)
        return {k: v for k, v in model.state_dict().items() if "_index" in k}

    plain = indices()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        reduced = indices()
    finally:
        dist.destroy_process_group()
    assert plain.keys() == reduced.keys() and len(plain) == 12
    assert all(torch.equal(plain[k], reduced[k]) for k in plain)
