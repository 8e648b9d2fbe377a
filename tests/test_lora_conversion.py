"""PEFT's `save_as_lora` on sparse adapters: servers that only take LoRA (vLLM) get an SVD export."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.conversion import save_as_lora

import sparse_peft  # noqa: F401
from sparse_peft import METHODS, SparseConfig

from .conftest import method_config, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_full_energy_export_reproduces_the_sparse_adapter(tmp_path, method):
    # rank=1.0 keeps every singular value: the LoRA is ΔW itself, up to the SVD's rounding
    model = get_peft_model(tiny_llama(), method_config(method, target_modules="all-linear", init_weights=False)).eval()
    x = torch.randint(0, 128, (2, 7))
    save_as_lora(str(tmp_path), model, rank=1.0)
    lora = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_a_rank_limited_export_of_gpt2_conv1d_layers_is_the_best_low_rank_fit(tmp_path):
    # Eckart-Young: the rank-4 SVD truncation misses exactly the tail singular values of ΔW
    model = get_peft_model(tiny_gpt2(), SparseConfig(method="spiel", target_modules=["c_attn", "c_fc"], init_weights=False))
    save_as_lora(str(tmp_path), model, rank=4)
    lora = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path))
    checked = 0
    for name, module in model.named_modules():
        if name.endswith(("c_attn", "c_fc")) and hasattr(module, "get_delta_weight"):
            delta = module.get_delta_weight("default").double()  # Conv1D layout (in × out)
            approx = lora.get_submodule(name).get_delta_weight("default").double()
            tail = torch.linalg.svdvals(delta)[4:]
            torch.testing.assert_close((approx - delta).norm(), tail.norm(), rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 4
