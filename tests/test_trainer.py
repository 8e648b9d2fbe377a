"""Training with the HF Trainer: gradient accumulation and clipping see the sparse parameters."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import sparse_peft
from sparse_peft import SparseConfig

from .conftest import tiny_llama


def test_trainer_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12))]
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="spiel", target_modules="all-linear", density=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=3, learning_rate=1e-2, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("sparse_values" in n for n in changed)

    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 9))
    model.eval()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
