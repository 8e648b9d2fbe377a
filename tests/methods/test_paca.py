"""PaCA: r random input columns per layer; only those columns of the input are kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sparse_peft import SparseConfig, SparseLayer
from sparse_peft.memory import saved_tensors

from ..conftest import tiny_llama
from .test_s2ft import assert_gradients_equal_dense


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def test_each_layer_trains_r_random_input_columns_with_the_dense_gradient():
    model = get_peft_model(tiny_llama().double(), SparseConfig(method="paca", num_columns=4, init_weights=False),
                           autocast_adapter_dtype=False)
    for name, layer in _layers(model).items():
        cols = layer.sparse_col_index["default"]
        assert layer.sparse_col_block["default"].shape == (layer.out_features, 4), name
        assert cols.unique().numel() == 4 and int(cols.max()) < layer.in_features
    assert len({tuple(m.sparse_col_index["default"].tolist()) for m in _layers(model).values()}) > 1  # random per layer
    assert assert_gradients_equal_dense(model, torch.randint(0, 128, (2, 9))) == 14


def test_backward_keeps_only_the_chosen_columns_of_each_input():
    base = tiny_llama().train()
    x = torch.randint(0, 128, (2, 12))
    counts = {}
    for name, config in (("paca", SparseConfig(method="paca", num_columns=2, target_modules=["down_proj"])),
                         ("lora", LoraConfig(r=2, target_modules=["down_proj"]))):
        model = get_peft_model(copy.deepcopy(base), config)
        with saved_tensors(model) as saved:
            model(x, labels=x).loss.backward()
        counts[name] = saved.bytes
    # down_proj's input is 64 wide: PaCA keeps 2 of its columns, LoRA all 64 (and its own rank-2 product)
    assert counts["paca"] < counts["lora"]


def test_the_budget_is_r_columns_or_the_general_one_never_both():
    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules="all-linear")).get_nb_trainable_parameters()[0]
    parity = get_peft_model(tiny_llama(), SparseConfig(method="paca", equivalent_rank=8)).get_nb_trainable_parameters()[0]
    assert parity == pytest.approx(lora, rel=0.05)
    with pytest.raises(ValueError, match="num_columns=4 and density both set PaCA's budget"):
        SparseConfig(method="paca", num_columns=4, density=0.1)
