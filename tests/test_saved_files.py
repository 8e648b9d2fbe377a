"""Adapter files written before methods became variants (tests/fixtures/adapters_before_variants, made
by make_adapters_before_variants.py at commit 492528b) load into the same base with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import sparse_peft  # noqa: F401

from .conftest import tiny_llama


FIXTURES = Path(__file__).parent / "fixtures" / "adapters_before_variants"


@pytest.mark.parametrize("method", ["spiel", "s2ft", "dsee", "sara", "lora_ggpo", "sltrain"])
def test_an_adapter_saved_before_the_redesign_loads_and_gives_the_same_logits(method):
    expected = load_file(FIXTURES / "expected_logits.safetensors")
    base = tiny_llama()
    base.load_state_dict(load_file(FIXTURES / "base.safetensors"))
    model = PeftModel.from_pretrained(base, FIXTURES / method).eval()
    assert model.peft_config["default"].method == method
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[method], rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(expected["input_ids"]).logits, expected[method], rtol=0, atol=1e-4)
