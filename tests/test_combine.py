"""add_weighted_adapter: Σ w·ΔW over adapters of any structure, exactly, and as a saved adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import sparse_peft  # noqa: F401
from sparse_peft import SparseConfig, SparseLayer

from .conftest import tiny_llama


NAMES, WEIGHTS = ["entries", "rows", "lowrank", "columns"], [1.0, -0.5, 2.0, 0.25]


def _model():
    model = get_peft_model(
        tiny_llama(), SparseConfig(target_modules="all-linear", density=0.1, r=2, init_weights=False), adapter_name="entries"
    )
    model.add_adapter("rows", SparseConfig(target_modules=["q_proj", "down_proj"], structure="rows", density=0.2, init_weights=False))
    model.add_adapter("lowrank", SparseConfig(target_modules=["v_proj", "q_proj"], structure="none", r=3, init_weights=False))
    model.add_adapter("columns", SparseConfig(target_modules=["o_proj"], structure="columns", density=0.3, init_weights=False))
    return model


def _layers(model, name):
    return {k: m for k, m in model.named_modules() if isinstance(m, SparseLayer) and name in m._all_available_adapter_names()}


def test_the_combination_is_the_weighted_sum_of_the_updates_in_float64():
    model = _model().double()
    model.add_weighted_adapter(NAMES, WEIGHTS, "mix")
    layers = _layers(model, "mix")
    assert len(layers) == len({k for n in NAMES for k in _layers(model, n)})  # the union of the adapted layers
    for layer in layers.values():
        expected = sum(w * layer.get_delta_weight(n) for n, w in zip(NAMES, WEIGHTS) if layer.get_delta(n) is not None)
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, rtol=1e-12, atol=1e-12)
    # the sparse parts share one support: their union, sorted, unique
    q = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    support = q.sparse_indices["mix"].long()
    assert torch.equal(support, support.unique())
    assert q.sparse_lora_A["mix"].shape[0] == 2 + 3  # ranks stack


def test_unit_weights_equal_activating_the_adapters_together():
    model = _model()
    x = torch.randint(0, 128, (2, 7))
    model.base_model.set_adapter(["entries", "rows"])
    together = model(x).logits
    model.add_weighted_adapter(["entries", "rows"], [1.0, 1.0], "sum")
    model.set_adapter("sum")
    torch.testing.assert_close(model(x).logits, together, rtol=1e-5, atol=1e-5)


def test_the_combined_adapter_saves_loads_and_merges(tmp_path):
    model = _model()
    model.add_weighted_adapter(NAMES, WEIGHTS, "mix")
    model.set_adapter("mix")
    x = torch.randint(0, 128, (2, 7))
    expected = model(x).logits
    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix"), adapter_name="mix")
    torch.testing.assert_close(again(x).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.merge_and_unload()(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_new_adapter_is_inactive_and_frozen_until_set():
    model = _model()
    model.add_weighted_adapter(NAMES, WEIGHTS, "mix")
    assert model.active_adapter == "entries"
    mix = [p for n, p in model.named_parameters() if ".mix" in n]
    assert mix and not any(p.requires_grad for p in mix)
    model.set_adapter("mix")
    assert all(p.requires_grad for p in mix)


def test_bad_requests_are_refused_and_change_nothing():
    model = _model()
    before = set(model.peft_config)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        model.add_weighted_adapter(["entries", "nope"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["entries", "rows"], [1.0], "mix")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["entries"], [1.0], "rows")
    with pytest.raises(ValueError, match="combination_type='linear'"):
        model.add_weighted_adapter(["entries"], [1.0], "mix", combination_type="svd")
    assert set(model.peft_config) == before
