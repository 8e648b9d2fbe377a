"""The README's main job, in its reduced mode: every stage runs offline and leaves its files."""

from __future__ import annotations

import torch

from sparse_peft import quickstart


def test_quickstart_quick_mode_runs_every_stage(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady timings on a shared 2-core machine
    try:
        args = ["--quick", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
        assert quickstart.main(args) == 0
        first = capsys.readouterr().out
        assert quickstart.main(args) == 0  # the second run reuses the cached base
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "loss_curves.png").stat().st_size > 1000
    for text in (first, second):
        assert "logits identical -- OK" in text and "trainable" in text and "lora" in text
    assert "cache" in second.lower()


def test_every_method_gets_loras_trainable_count_from_lora_budget():
    # the quickstart's --method takes every preset; each must build at LoRA's budget (dsee, sltrain and
    # lora_ggpo carry a rank of their own, which equivalent_rank alone would leave no room for)
    import pytest
    from peft import LoraConfig, get_peft_model

    from sparse_peft import METHODS, SparseConfig
    from sparse_peft.methods import lora_budget

    from .conftest import tiny_llama

    lora = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules="all-linear")).get_nb_trainable_parameters()[0]
    for name in METHODS:
        config = SparseConfig(method=name, target_modules="all-linear", **lora_budget(name, 8))
        trainable = get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()[0]
        assert trainable == pytest.approx(lora, rel=0.05), name
    with pytest.raises(ValueError, match="unknown method"):
        lora_budget("nope", 8)


def test_quickstart_runs_another_method(tmp_path, capsys):
    # the default (dsee) has a low-rank part; spiel has a regrowth schedule instead
    args = ["--quick", "--method", "spiel", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
            "--device", "cpu"]
    assert quickstart.main(args) == 0
    assert "sparse (spiel)" in capsys.readouterr().out
