"""PEFT's generic contract on any module, for every method: a non-identity `init_weights=False` that
differs between adapters, and a gradient for every trainable tensor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import sparse_peft  # noqa: F401
from sparse_peft import METHODS, SparseConfig, SparseLayer, SparseScheduler

from .conftest import method_config, tiny_llama


X = torch.randint(0, 128, (2, 9))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))


def _config(method, **kwargs):
    # S²FT needs target_modules on a model without a map; the others take their default targets
    return method_config(method, **kwargs)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_init_weights_false_changes_the_output_and_differs_between_adapters(method):
    base = tiny_llama()
    reference = base(X).logits
    model = get_peft_model(copy.deepcopy(base), _config(method, init_weights=False))
    model.eval()
    assert (model(X).logits - reference).abs().max() > 1e-3
    model.add_adapter("other", _config(method, init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    first = torch.cat([t.detach().reshape(-1) for m in layers for t in m.get_delta("default").__dict__.values()
                       if torch.is_tensor(t) and t.is_floating_point()])
    second = torch.cat([t.detach().reshape(-1) for m in layers for t in m.get_delta("other").__dict__.values()
                        if torch.is_tensor(t) and t.is_floating_point()])
    assert first.shape == second.shape and not torch.equal(first, second)
    model.set_adapter("other")
    assert not torch.equal(model(X).logits, reference)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model_kind", ["mlp", "llama"])
def test_every_trainable_tensor_gets_a_gradient(method, model_kind):
    if model_kind == "mlp":
        model = get_peft_model(_mlp(), _config(method, target_modules=["0", "2"]))
        out = model(torch.randn(6, 16))
    else:
        model = get_peft_model(tiny_llama().train(), _config(method))
        out = model(X, labels=X).loss
    # B = 0 at the start gives A no gradient (LoRA's own init): one step on B first
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    SparseScheduler(model, opt, total_steps=10)  # SpIEL's and SaRA's schedules need the run's length
    out.pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    out = model(torch.randn(6, 16)) if model_kind == "mlp" else model(X, labels=X).loss
    out.pow(2).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    silent = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not silent, silent
