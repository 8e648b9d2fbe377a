"""Mixed-adapter batches: `adapter_names=[...]`, one adapter per sample, as PEFT's LoRA has them."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import sparse_peft  # noqa: F401
from sparse_peft import SparseConfig

from .conftest import tiny_gpt2, tiny_llama


def _model(factory=tiny_llama):
    model = get_peft_model(factory(), SparseConfig(target_modules="all-linear", density=0.1, r=2, init_weights=False))
    model.add_adapter("rows", SparseConfig(target_modules="all-linear", structure="rows", density=0.2, init_weights=False))
    return model.eval()


def _alone(model, x, name):
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=x).logits
    model.set_adapter(name)
    return model(input_ids=x).logits


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_each_sample_gets_its_own_adapter(factory):
    model = _model(factory)
    x = torch.randint(0, 128, (4, 9))
    names = ["rows", "__base__", "default", "rows"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], _alone(model, x, name)[i], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)  # the adapters do differ


def test_generate_with_a_mixed_batch_and_beams():
    model = _model()
    x = torch.randint(0, 128, (2, 5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for beams in (1, 2):
            mixed = model.generate(input_ids=x, adapter_names=["rows", "default"], num_beams=beams, **kwargs)
            for i, name in enumerate(["rows", "default"]):
                model.set_adapter(name)
                alone = model.generate(input_ids=x[i : i + 1], num_beams=beams, **kwargs)
                assert torch.equal(mixed[i : i + 1], alone), (beams, name)


def test_mixed_batches_refuse_training_unknown_names_merged_adapters_and_wrong_lengths():
    model = _model()
    x = torch.randint(0, 128, (2, 5))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=x, adapter_names=["default", "rows"])
    model.eval()
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(input_ids=x, adapter_names=["default", "typo"])
    with pytest.raises(ValueError, match="one name per sample"):
        model(input_ids=x, adapter_names=["default"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=x, adapter_names=["default", "rows"])
