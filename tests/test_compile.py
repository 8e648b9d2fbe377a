"""torch.compile: every method's layers trace as one graph, forward and backward, and match eager."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import sparse_peft
from sparse_peft import METHODS, SparseConfig

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
