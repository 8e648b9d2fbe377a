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
