"""torch.compile: every method's layers trace as one graph, forward and backward, and match eager."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import sparse_peft
from sparse_peft import METHODS

from .conftest import method_config



def _one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fullgraph_compile_matches_eager(method, monkeypatch):
    # aot_eager runs AOTAutograd's tracing of forward and backward (what inductor would compile)
    # without generating kernels; fullgraph=True turns any graph break into an error
    kwargs = dict(num_trainable=2000) if method == "s2ft" else dict(target_modules="all-linear")
    model = get_peft_model(_one_layer_llama().train(), method_config(method, init_weights=False, **kwargs))
    ids = torch.randint(0, 128, (2, 12))
    torch._dynamo.reset()
    # eager: weight gradients in blocks of 2 rows (as large layers are); compiled: one block
    monkeypatch.setattr(sparse_peft.ops, "_BLOCK_ELEMENTS", 64)
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # GGPO's noisy training forward draws its noise eagerly (perturbation.perturbed_linear), and a layer
    # collecting gradient statistics (RoSA's warm-up) runs its probe eagerly (ops._run_probe): a graph break
    # per layer, so those compile without fullgraph; their eval forward is checked whole below
    collecting = any(m.sparse_probe for m in model.modules() if isinstance(m, sparse_peft.SparseLayer))
    fullgraph = not (collecting or any(m.sparse_noise for m in model.modules() if isinstance(m, sparse_peft.SparseLayer)))
    loss = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    if not fullgraph:
        model.eval()
        torch._dynamo.reset()
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
            torch.testing.assert_close(compiled, model(input_ids=ids).logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compiled_decoding_follows_in_place_updates(method):
    # an RL loop decodes with a compiled forward (generate's static cache compiles it), then an optimizer step
    # writes the adapter in place: the next compiled call must see the new values, not the update the layer kept
    # between one-token calls (layer._DecodePlan), and trace as one graph
    kwargs = dict(num_trainable=2000) if method == "s2ft" else dict(target_modules="all-linear")
    model = get_peft_model(_one_layer_llama(), method_config(method, init_weights=False, **kwargs)).eval()
    ids = torch.randint(0, 128, (1, 1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, msg=f"step {step}")
            before = model(input_ids=ids).logits
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
            assert not torch.allclose(model(input_ids=ids).logits, before)  # the update changed the output


def test_compiled_decoding_follows_every_change_to_the_adapter():
    # as tests/test_serving.py's eager check, through one compiled graph per layer call: in place, frozen slots
    # written in (SaRA's progressive step), a new scale. The layer's kept decoding update is an eager-only
    # shortcut: tracing it read tensor versions, which Dynamo could not guard on once frozen slots existed
    from .test_serving import _randomized
    from .conftest import tiny_llama

    model = _randomized(get_peft_model(tiny_llama(), method_config("dsee", target_modules="all-linear"))).eval()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)

    def check():
        dense = layer.get_base_layer().weight.double() + layer.get_delta_weight("default").double()
        torch.testing.assert_close(compiled(x).double(), x.double() @ dense.t(), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        check()
        layer.sparse_values["default"].mul_(-2)
        check()
        layer.freeze_slots("default", torch.arange(layer.sparse_values["default"].numel()) % 3 == 0)
        check()
        layer.sparse_frozen_values["default"].mul_(2)
        layer.sparse_values["default"].mul_(-3)
        check()
        layer.sparse_part_scale["default"] = 3.0
        check()
