"""Serving unmerged (issue #17): a support's index forms are made once per support, never per forward, and the
products that use them (CSR at inference, the cached rows and columns in training) give the same outputs as a
dense float64 reference, for every method, unmerged and in mixed batches."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import sparse_peft  # noqa: F401
from sparse_peft import METHODS, SparseLayer, ops

from .conftest import method_config, tiny_llama


def _randomized(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _dense_reference(model, ids, adapter="default"):
    """The same model with every layer's ΔW added into a float64 copy of its weight: no sparse product."""
    import copy

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, SparseLayer) and module.get_delta(adapter) is not None:
                base = module.get_base_layer()
                base.weight += module.get_delta_weight(adapter).to(base.weight.dtype)
        with ref.disable_adapter():
            return ref(input_ids=ids).logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_index_forms_are_made_once_per_support_not_per_forward(method, monkeypatch):
    model = _randomized(get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))).eval()
    ids = torch.randint(0, 128, (1, 6))
    calls = []
    real = ops.split_flat
    monkeypatch.setattr(ops, "split_flat", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(input_ids=ids)
        first = len(calls)
        for _ in range(3):
            model(input_ids=ids)
            model(input_ids=ids[:, :1])  # a decoding-sized call
    assert len(calls) == first, f"{len(calls) - first} index splits after the first forward"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unmerged_outputs_equal_the_dense_float64_reference(method):
    model = _randomized(get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    reference = _dense_reference(model, ids)
    with torch.no_grad():
        for b, n in ((2, 7), (2, 1), (1, 1)):  # a prefill-sized call, a decoding-sized one, one token (added in place)
            got = model(input_ids=ids[:b, :n]).logits.double()
            torch.testing.assert_close(got, reference[:b, :n], rtol=1e-5, atol=1e-5)


def test_one_token_is_added_into_the_base_output_only_where_no_hook_has_seen_it():
    # decoding adds the update into the base layer's fresh output; a forward hook on the base layer keeps what it saw
    model = _randomized(get_peft_model(tiny_llama(), method_config("dsee", target_modules="all-linear"))).eval()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    seen = []
    x = torch.randn(1, 1, layer.in_features)
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + layer.get_delta("default").apply(x)
        torch.testing.assert_close(layer(x), expected)
        handle = layer.get_base_layer().register_forward_hook(lambda m, i, out: seen.append(out.clone()) or None)
        kept = []
        handle2 = layer.get_base_layer().register_forward_hook(lambda m, i, out: kept.append(out))
        torch.testing.assert_close(layer(x), expected)
        handle.remove(), handle2.remove()
    torch.testing.assert_close(kept[0], seen[0])  # the tensor the hook kept is still the base output


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixed_batches_give_each_sample_its_adapters_output(method):
    model = get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))
    model.add_adapter("other", method_config(method, target_modules="all-linear", seed=7))
    _randomized(model).eval()
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(5))
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_changed_support_or_moved_values_get_fresh_index_forms():
    # regrowth writes the index buffer in place (its version changes); a device or dtype move gives the values new
    # storage: the kept CSR matrix, which holds the values themselves, must not outlive either
    model = _randomized(get_peft_model(tiny_llama(), method_config("spiel", target_modules="all-linear"))).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 32)
    with torch.no_grad():
        before = layer(x)
        indices = layer.sparse_indices["default"]
        k = indices.numel()
        new = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(9))[:k].sort().values
        indices.copy_(new.to(indices.dtype))  # what a regrowth does
        after = layer(x)
        dense = layer.get_base_layer().weight + layer.get_delta_weight("default")
        torch.testing.assert_close(after, x @ dense.t(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(before, after)
        values = layer.sparse_values["default"]
        values.data = values.data * 2  # new storage, the same Parameter
        dense = layer.get_base_layer().weight + layer.get_delta_weight("default")
        torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-6)


def test_the_csr_product_equals_the_gather_and_the_dense_blocks():
    g = torch.Generator().manual_seed(0)
    out_f, in_f, k = 48, 40, 200
    indices = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(torch.int32)
    values = torch.randn(k, generator=g, dtype=torch.float64)
    dense = torch.zeros(out_f * in_f, dtype=torch.float64).index_put_((indices.long(),), values).view(out_f, in_f)
    layout = ops.Layout(indices, in_f)
    for n in (1, 3, 64):
        a = torch.randn(n, in_f, generator=g, dtype=torch.float64)
        torch.testing.assert_close(ops.csr_times(a, values, layout, out_f), a @ dense.t())
        for mode in ("gather", "sparse", "dense"):
            torch.testing.assert_close(ops._times_delta(a, values, indices, (out_f, in_f), False, mode), a @ dense.t())


@pytest.mark.parametrize("method, tokens", [("spiel", 3), ("dsee", 1)])  # a prefill-sized call, decoding
def test_a_mixed_batch_leaves_the_output_a_base_layer_hook_kept(method, tokens):
    model = _randomized(get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))).eval()
    base = model.base_model.model.model.layers[0].mlp.gate_proj.get_base_layer()
    copies, kept = [], []
    handles = [base.register_forward_hook(lambda m, i, out: copies.append(out.clone()) or None),
               base.register_forward_hook(lambda m, i, out: kept.append(out))]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, tokens)), adapter_names=["default", "__base__"])
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(kept[0], copies[0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_decoding_reads_the_adapter_once_not_per_token(method, monkeypatch):
    # one token at inference goes through the Delta a layer keeps between calls: get_delta (its lookups, the
    # layout's checks) runs once per layer, not once per layer per token; every method's update takes this path
    model = _randomized(get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))).eval()
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    calls = []
    real = SparseLayer.get_delta
    monkeypatch.setattr(SparseLayer, "get_delta", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    ids = torch.randint(0, 128, (1, 1))
    with torch.no_grad():
        model(input_ids=ids)
        assert len(calls) == len(layers)
        for _ in range(3):
            model(input_ids=ids)
    assert len(calls) == len(layers)
    assert all(layer._sparse_decode["default"].delta is not None for layer in layers)


def test_the_kept_decoding_update_follows_every_change_to_the_adapter():
    # the kept Delta must never outlive what it was made from: an optimizer step (in place), a reloaded tensor
    # (a new Parameter), a new scale, SaRA-style frozen slots, another active adapter, a deleted adapter
    model = get_peft_model(tiny_llama(), method_config("dsee", target_modules="all-linear"))
    model.add_adapter("other", method_config("dsee", target_modules="all-linear", seed=5))
    _randomized(model).eval()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(6))

    def check(adapter="default"):
        dense = layer.get_base_layer().weight.double() + layer.get_delta_weight(adapter).double()
        torch.testing.assert_close(layer(x).double(), x.double() @ dense.t(), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        check()
        layer.sparse_values["default"].mul_(-2)  # an optimizer step
        layer.sparse_lora_B["default"].add_(0.1)
        check()
        layer.sparse_values["default"] = torch.nn.Parameter(torch.randn_like(layer.sparse_values["default"]))
        check()
        layer.sparse_part_scale["default"] = 3.0
        layer.sparse_scaling["default"] = 0.5
        check()
        k = layer.sparse_values["default"].numel()
        layer.freeze_slots("default", torch.arange(k) % 3 == 0)
        before = layer.sparse_frozen_values["default"].clone()
        check()
        assert layer._sparse_decode["default"].delta is not None  # decoded with the frozen values written in
        layer.sparse_frozen_values["default"].mul_(2)
        assert not torch.equal(before, layer.sparse_frozen_values["default"])
        check()
        model.set_adapter("other")
        check("other")
    model.delete_adapter("default")
    assert "default" not in layer._sparse_decode and "default" not in layer.__dict__.get("_sparse_layouts", {})
    with torch.no_grad():
        check("other")


def test_decoding_rows_and_columns_in_any_order_equals_dense():
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 12, 10
    v = torch.randn(in_f, generator=g, dtype=torch.float64)
    rows, cols = torch.tensor([7, 2, 9], dtype=torch.int32), torch.tensor([4, 0, 8, 1], dtype=torch.int32)
    row_block = torch.randn(3, in_f, generator=g, dtype=torch.float64)
    col_block = torch.randn(out_f, 4, generator=g, dtype=torch.float64)
    for span_rows, span_cols in ((None, None), ((3, 6), (2, 6))):
        r = rows if span_rows is None else torch.arange(*span_rows)
        c = cols if span_cols is None else torch.arange(*span_cols)
        dense = torch.zeros(out_f, in_f, dtype=torch.float64)
        dense[r.long()] += row_block
        dense[:, c.long()] += col_block
        y0 = torch.randn(out_f, generator=g, dtype=torch.float64)
        y = y0.clone()
        ops.decode_rows(y, v, row_block, r, span_rows, scale=0.5)
        ops.decode_columns(y, v, col_block, c, span_cols, scale=0.5)
        torch.testing.assert_close(y, y0 + 0.5 * dense @ v)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_decoding_mixed_batch_gives_each_sample_its_adapters_token(method):
    # one token per sample: "other" has two samples (each added into its row on its own), "default" three (one
    # product over the group); both must give what each adapter gives alone
    model = get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear"))
    model.add_adapter("other", method_config(method, target_modules="all-linear", seed=7))
    _randomized(model).eval()
    names = ["default", "other", "__base__", "default", "default", "other"]
    ids = torch.randint(0, 128, (len(names), 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for name in ("default", "other", "__base__"):
            rows = [i for i, n in enumerate(names) if n == name]
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[rows]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[rows]).logits
            torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)



def test_one_token_in_training_mode_keeps_lora_ggpos_perturbation():
    # the decoding path skips the general path's checks, not its behaviour: with LoRA-GGPO's noise set on a layer
    # in training mode, one token sees the same perturbed base as the same token inside a longer call
    model = _randomized(get_peft_model(tiny_llama(), method_config("lora_ggpo", target_modules="all-linear")))
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    layer.train()
    layer.sparse_noise["default"] = (torch.full((layer.out_features,), 0.5), 11)
    x = torch.randn(1, 2, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone, together = layer(x[:, :1]), layer(x)
        clean = layer.get_base_layer()(x[:, :1]) + layer.get_delta("default").apply(x[:, :1])
    torch.testing.assert_close(alone, together[:, :1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone, clean, atol=1e-3)
