"""Architecture maps (issue #13, item 5): S²FT on the families people fine-tune, models without a map,
mixture-of-experts models whose experts are fused parameters, and each method's default targets."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model

from sparse_peft import SparseConfig, architectures

from .conftest import Conv2dModel, tiny_llama
from .methods.test_s2ft import _adapted, assert_gradients_equal_dense

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _gemma(version):
    import transformers as T

    # head_dim 16 with 4 heads: heads × head_dim (64) is not hidden_size, as in real Gemmas
    config_cls, model_cls = {2: (T.Gemma2Config, T.Gemma2ForCausalLM), 3: (T.Gemma3TextConfig, T.Gemma3ForCausalLM)}[version]
    return model_cls(config_cls(intermediate_size=64, num_key_value_heads=2, head_dim=16, **COMMON))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(intermediate_size=64, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1, **COMMON))


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(intermediate_size=64, **COMMON))


def _falcon(new_decoder_architecture=False):
    from transformers import FalconConfig, FalconForCausalLM

    extra = dict(new_decoder_architecture=True, num_kv_heads=2) if new_decoder_architecture else {}
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          **extra))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, **COMMON))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_key_value_heads=2,
                                              shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                              **COMMON))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # layer 1 is a dense MLP (mlp_only_layers): its down_proj is a layer, layer 0's experts are parameters
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_key_value_heads=2,
                                              num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], **COMMON))


# factory, head_dim, attention output suffix, expected adapted modules (name within a layer)
FAMILIES = {
    "gemma2": (lambda: _gemma(2), 16, "o_proj", {"0.self_attn.o_proj", "0.mlp.down_proj", "1.self_attn.o_proj", "1.mlp.down_proj"}),
    "gemma3_text": (lambda: _gemma(3), 16, "o_proj", {"0.self_attn.o_proj", "0.mlp.down_proj", "1.self_attn.o_proj", "1.mlp.down_proj"}),
    "phi3": (_phi3, 8, "o_proj", {"0.self_attn.o_proj", "0.mlp.down_proj", "1.self_attn.o_proj", "1.mlp.down_proj"}),
    "gpt_neox": (_neox, 8, "attention.dense", {"0.attention.dense", "0.mlp.dense_4h_to_h", "1.attention.dense", "1.mlp.dense_4h_to_h"}),
    "falcon": (_falcon, 8, "self_attention.dense",
               {"0.self_attention.dense", "0.mlp.dense_4h_to_h", "1.self_attention.dense", "1.mlp.dense_4h_to_h"}),
    "falcon_gqa": (lambda: _falcon(True), 8, "self_attention.dense",
                   {"0.self_attention.dense", "0.mlp.dense_4h_to_h", "1.self_attention.dense", "1.mlp.dense_4h_to_h"}),
    # Mixtral's FFN is all experts: only the attention output adapts
    "mixtral": (_mixtral, 8, "o_proj", {"0.self_attn.o_proj", "1.self_attn.o_proj"}),
    "qwen2_moe": (_qwen2_moe, 8, "o_proj", {"0.self_attn.o_proj", "0.mlp.shared_expert.down_proj", "1.self_attn.o_proj",
                                            "1.mlp.shared_expert.down_proj"}),
    "qwen3_moe": (_qwen3_moe, 8, "o_proj", {"0.self_attn.o_proj", "1.self_attn.o_proj", "1.mlp.down_proj"}),
}


def _float64(model):
    if architectures.fused_experts(model):
        model.set_experts_implementation("eager")  # the default grouped_mm has no float64
    return model.double().eval()


def _within_layer(name):
    return name.split(".layers.")[-1].split(".h.")[-1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_s2ft_default_targets_whole_heads_and_exact_gradients(family):
    factory, head_dim, attention_output, expected = FAMILIES[family]
    torch.manual_seed(0)
    base = _float64(factory())
    config = SparseConfig(method="s2ft", density=0.5, init_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    layers = _adapted(model)
    assert {_within_layer(n) for n in layers} == expected
    heads_seen = 0
    for name, layer in layers.items():
        if name.endswith("." + attention_output):
            cols = layer.sparse_col_index["default"].long()
            heads = cols.reshape(-1, head_dim)
            assert heads.shape[0] == 2, name  # half of the 4 query heads
            assert torch.equal(heads, heads[:, :1] + torch.arange(head_dim)) and bool((heads[:, 0] % head_dim == 0).all())
            heads_seen += 1
    assert heads_seen == 2
    x = torch.randint(0, 128, (2, 7))
    assert_gradients_equal_dense(model, x)


@pytest.mark.parametrize("family, coupled", [("gemma2", ["ffn_up", "value"]), ("gpt_neox", ["ffn_up"]),
                                             ("falcon", ["ffn_up"]), ("qwen2_moe", ["ffn_up", "value"])])
def test_coupled_rows_where_the_producing_layers_are_separate(family, coupled):
    torch.manual_seed(0)
    base = _float64(FAMILIES[family][0]())
    model = get_peft_model(base, SparseConfig(method="s2ft", density=0.5, init_weights=False, coupled_rows=coupled),
                           autocast_adapter_dtype=False)
    layers = _adapted(model)
    mapped = architectures.ARCHITECTURES[base.config.model_type]
    rows = {n: layer.sparse_row_index["default"].long() for n, layer in layers.items() if "default" in layer.sparse_row_index}
    assert rows
    for name, idx in rows.items():
        for up in mapped.ffn_up:
            if name.endswith("." + up):  # FFN channel j: row j of up/gate, column j of down
                down = name[: -len(up)] + mapped.ffn_down
                assert torch.equal(idx, layers[down].sparse_col_index["default"].long())
    assert_gradients_equal_dense(model, torch.randint(0, 128, (2, 7)))


@pytest.mark.parametrize("family, role, match", [
    ("phi3", "ffn_up", "fuses gate and up in one layer"), ("phi3", "value", "q, k and v in one layer"),
    ("gpt_neox", "value", "q, k and v in one layer"), ("falcon", "value", "q, k and v in one layer"),
    ("mixtral", "ffn_up", "no such layer.*fused 3-D parameters"),
])
def test_coupled_rows_of_fused_or_missing_layers_are_refused_with_the_fix(family, role, match):
    with pytest.raises(ValueError, match=f"{match}.*remove '{role}' from coupled_rows"):
        get_peft_model(FAMILIES[family][0](), SparseConfig(method="s2ft", coupled_rows=[role]))


# -- models without a map (a) ---------------------------------------------------------------------------


def test_s2ft_on_a_model_without_a_map_trains_plain_columns_of_the_named_targets():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", target_modules=["0", "2"], density=0.25,
                                                             init_weights=False), autocast_adapter_dtype=False)
    layers = _adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"0", "2"}
    assert [layers[n].sparse_col_index["default"].numel() for n in sorted(layers)] == [2, 4]  # 25% of 8 and 16 columns
    x = torch.randn(5, 8, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    reference = copy.deepcopy(model).merge_and_unload().requires_grad_(True)
    reference(x).pow(2).sum().backward()
    for name, layer in layers.items():
        cols = layer.sparse_col_index["default"].long()
        weight = reference.get_submodule(name.removeprefix("base_model.model.")).weight
        assert torch.allclose(layer.sparse_col_block["default"].grad, weight.grad[:, cols], atol=1e-12)


def test_an_unmapped_transformer_with_named_targets_trains_and_refuses_what_needs_the_map():
    from transformers import BertConfig, BertModel

    make = lambda: BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    model = get_peft_model(make(), SparseConfig(method="s2ft", target_modules=["attention.output.dense", "output.dense"]))
    assert len(_adapted(model)) == 2
    model(torch.randint(0, 100, (2, 5))).last_hidden_state.sum().backward()
    with pytest.raises(ValueError, match="no model_type='bert'.*pass target_modules explicitly"):
        get_peft_model(make(), SparseConfig(method="s2ft"))
    with pytest.raises(ValueError, match="coupled_rows=.*no model_type='bert'.*remove coupled_rows"):
        get_peft_model(make(), SparseConfig(method="s2ft", target_modules=["output.dense"], coupled_rows=["ffn_up"]))
    with pytest.raises(ValueError, match="no model_type='custom'.*pass target_modules explicitly"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), SparseConfig(method="s2ft"))


def test_a_named_target_whose_heads_are_unknown_gets_plain_columns():
    model = get_peft_model(tiny_llama(), SparseConfig(method="s2ft", density=0.5, target_modules=["o_proj", "q_proj"]))
    for name, layer in _adapted(model).items():
        cols = layer.sparse_col_index["default"].long()
        assert cols.numel() == 16
        if name.endswith("o_proj"):  # 2 of 4 heads of 8
            assert torch.equal(cols.reshape(2, 8), cols.reshape(2, 8)[:, :1] + torch.arange(8))


# -- mixture of experts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family, targets", [("mixtral", ["experts"]), ("mixtral", ["o_proj", "down_proj"]),
                                             ("qwen3_moe", ["gate_up_proj"]), ("qwen2_moe", r".*\.experts")])
def test_fused_expert_parameters_are_refused_with_the_reason(family, targets):
    with pytest.raises(ValueError, match="fused 3-D parameters.*not layers"):
        get_peft_model(FAMILIES[family][0](), SparseConfig(method="spiel", target_modules=targets))


def test_moe_defaults_report_the_frozen_experts_and_the_adapter_reloads(tmp_path, caplog):
    torch.manual_seed(0)
    base = _mixtral()
    with caplog.at_level(logging.WARNING, logger="sparse_peft"):
        model = get_peft_model(copy.deepcopy(base), SparseConfig(method="s2ft", init_weights=False))
    [line] = [r.getMessage() for r in caplog.records if r.name == "sparse_peft"]
    assert "method='s2ft'" in line and "2 modules (o_proj)" in line and "fused 3-D parameters" in line
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randint(0, 128, (2, 5))
    assert torch.allclose(again(x).logits, model(x).logits)
    assert architectures.fused_experts(base) and not architectures.fused_experts(tiny_llama())


# -- default targets per method (c) ---------------------------------------------------------------------

ALL_LINEAR = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
              "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}
QUERY_VALUE = {"llama": {"q_proj", "v_proj"}, "phi3": {"qkv_proj"}}
OUTPUTS = {"llama": {"o_proj", "down_proj"}, "phi3": {"o_proj", "down_proj"}}
DECIDED = {"spiel": ALL_LINEAR, "lora_ggpo": ALL_LINEAR, "sltrain": ALL_LINEAR, "sara": ALL_LINEAR,
           "dsee": QUERY_VALUE, None: QUERY_VALUE, "s2ft": OUTPUTS}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("method", list(DECIDED))
def test_each_method_without_target_modules_gets_its_papers_targets_and_says_so(method, arch, caplog):
    base = tiny_llama() if arch == "llama" else _phi3()
    with caplog.at_level(logging.WARNING, logger="sparse_peft"):
        model = get_peft_model(base, SparseConfig(method=method))
    adapted = _adapted(model)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == DECIDED[method][arch]
    assert "lm_head" not in " ".join(adapted)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparse_peft"]
    assert len(lines) == 1, lines  # one line per adapter, not one per module
    assert f"method={method!r}" in lines[0] and f"{len(adapted)} modules" in lines[0]


def test_named_targets_are_not_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_peft"):
        get_peft_model(tiny_llama(), SparseConfig(method="spiel", target_modules=["q_proj"]))
    assert not [r for r in caplog.records if r.name == "sparse_peft"]


def test_sara_defaults_to_convolutions_too():
    model = get_peft_model(Conv2dModel(), SparseConfig(method="sara"))
    assert set(_adapted(model)) == {"base_model.model.conv2d", "base_model.model.lin0"}
    with pytest.raises(ValueError, match="pass target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(4, 4)), SparseConfig(method="dsee"))
