"""bitsandbytes 8-bit and 4-bit base layers (bitsandbytes runs on the CPU)."""

from __future__ import annotations


import pytest
import torch
from peft import get_peft_model

from sparse_peft import SparseConfig, SparseLayer


bnb = pytest.importorskip("bitsandbytes")
X = torch.randint(0, 128, (2, 9))


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # hidden sizes under 64 crash inside bnb's 4-bit CPU path
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("base")
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def _load(path, bits):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": "cpu"})


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_trains_counts_and_merges(saved_base, bits):
    path, n_base = saved_base
    base = _load(path, bits)
    base_out = base(X).logits
    model = get_peft_model(base, SparseConfig(target_modules="all-linear", init_weights=False, density=0.1, r=2))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SparseLayer) and layer.quantization_backend.backend_name == f"bnb {bits}bit"
    assert f"bnb {bits}bit" in repr(layer) or isinstance(layer.get_base_layer(), (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))

    trainable, total = model.get_nb_trainable_parameters()
    assert total == n_base + trainable  # 4-bit weights count at their original size

    out = model(X).logits
    effect = (out - base_out).abs().mean()
    assert effect > 1e-3
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert not any(p.grad is not None for n, p in model.named_parameters() if not p.requires_grad)

    # merging requantizes, so it is only approximately exact: the error stays well below the adapter's effect
    before = layer.quantization_backend.get_base_weight(layer.get_base_layer()).clone()
    delta = layer.get_delta_weight("default").detach()
    model.merge_adapter()
    after = layer.quantization_backend.get_base_weight(layer.get_base_layer())
    assert (after - (before + delta)).abs().mean() < (after - before).abs().mean()
    merged_err = (model(X).logits - out).abs().mean()
    assert merged_err < (0.1 if bits == 8 else 0.6) * effect
    model.unmerge_adapter()
    with model.disable_adapter():
        assert (model(X).logits - base_out).abs().mean() < (0.1 if bits == 8 else 0.6) * effect
