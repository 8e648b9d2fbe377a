"""LoRA-GGPO in the layers: noise on the base weight in training forwards only, scaled by the schedule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

import sparse_peft
from sparse_peft import SparseCallback, SparseConfig, SparseLayer, SparseScheduler
from sparse_peft.perturbation import ggpo_row_std, row_sq_norms

from ..conftest import tiny_llama


def _adapted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).double()


def test_noise_scale_follows_the_papers_formula_from_the_previous_steps_gradients():
    model = get_peft_model(_mlp(), SparseConfig(method="lora_ggpo", target_modules=["0", "2"], init_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = SparseScheduler(model, opt)
    layer = _adapted(model)["base_model.model.0"]
    a, b = layer.sparse_lora_A["default"], layer.sparse_lora_B["default"]
    # before any gradient: only the weight norms, ‖W'_i‖² ≈ ‖W0_i‖² + ‖(sBA)_i‖² (Eq. 7)
    w_sq = (layer.get_base_layer().weight.pow(2).sum(1) + (b @ a).pow(2).sum(1)).detach()
    std0, _ = layer.sparse_noise["default"]
    assert torch.allclose(std0, (0.03**2 / 16 * w_sq).sqrt())
    x = torch.randn(8, 16, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    scheduler.before_optimizer_step()
    std1, seed1 = layer.sparse_noise["default"]
    grad = (b @ a.grad + b.grad @ a).detach()  # dL/dW' through the adapter, Eq. 8
    expected = (0.03**2 / 16 * (w_sq + 0.01 * grad.pow(2).sum(1))).sqrt()
    assert torch.allclose(std1, expected)
    assert torch.allclose(std1, ggpo_row_std(row_sq_norms(layer.get_base_layer().weight), a, b, a.grad, b.grad, 1.0))


def test_training_forward_adds_the_seeded_noise_and_eval_does_not():
    from sparse_peft.perturbation import perturbed_weight

    base = _mlp()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="lora_ggpo", target_modules=["0"]))
    SparseScheduler(model, None)
    layer = _adapted(model)["base_model.model.0"]
    std, seed = layer.sparse_noise["default"]
    x = torch.randn(5, 16, dtype=torch.float64)
    model.train()
    noisy = layer(x)
    expected = x @ perturbed_weight(base[0].weight, std, seed).T + base[0].bias  # B = 0: the adapter adds nothing yet
    assert torch.allclose(noisy, expected)
    assert not torch.allclose(noisy, base[0](x))
    model.eval()
    assert torch.equal(layer(x), base[0](x))
    assert torch.equal(layer.get_base_layer().weight, base[0].weight)  # never perturbed in place


def _noisy_layer_and_reference(base):
    from sparse_peft.perturbation import perturbed_linear

    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="lora_ggpo", target_modules=["0"], init_weights=False))
    SparseScheduler(model, None)
    model.train()
    layer = _adapted(model)["base_model.model.0"]
    std, seed = layer.sparse_noise["default"]
    a, b = layer.sparse_lora_A["default"], layer.sparse_lora_B["default"]
    a_ref, b_ref = (t.detach().clone().requires_grad_(True) for t in (a, b))
    w0 = layer.get_base_layer()
    scaling = layer.get_delta("default").scaling

    def reference(x):  # the noisy base layer and LoRA's own product, side by side
        lora = ((x.to(a_ref.dtype) @ a_ref.t() @ b_ref.t()) * scaling).to(w0.weight.dtype)
        return perturbed_linear(x, w0.weight, w0.bias, std, seed) + lora

    return layer, (a, b), (a_ref, b_ref), reference


def test_training_forward_folds_the_adapter_into_the_noisy_weight():
    # one GEMM on W0 + ε + s·B·A; the same output and adapter gradients as LoRA beside the noisy layer
    layer, params, refs, reference = _noisy_layer_and_reference(_mlp())
    x = torch.randn(5, 16, dtype=torch.float64)
    dy = torch.randn(5, 32, dtype=torch.float64)
    y, y_ref = layer(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.grad, r.grad)


def test_low_precision_base_keeps_the_adapter_out_of_the_noisy_weight():
    # bf16 W0 with fp32 adapters: folding would round s·B·A into bf16, so the adapter keeps its own product
    layer, params, refs, reference = _noisy_layer_and_reference(_mlp().to(torch.bfloat16))
    assert params[0].dtype == torch.float32
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), reference(x))


def test_at_eval_it_is_plain_lora_and_matches_peft_and_trains_noisy_with_no_schedule_attached():
    base = _mlp()
    ours = get_peft_model(copy.deepcopy(base), SparseConfig(method="lora_ggpo", target_modules=["0", "2"], init_weights=False))
    x = torch.randn(5, 16, dtype=torch.float64)
    peft_lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    for name, layer in _adapted(ours).items():
        lora = peft_lora.base_model.model.get_submodule(name.removeprefix("base_model.model."))
        lora.lora_A["default"].weight.data.copy_(layer.sparse_lora_A["default"])
        lora.lora_B["default"].weight.data.copy_(layer.sparse_lora_B["default"])
    ours.eval(), peft_lora.eval()
    assert torch.allclose(ours(x), peft_lora(x))
    # training forwards carry the noise from the adapter's creation on: nothing to attach
    ours.train(), peft_lora.train()
    assert not torch.allclose(ours(x), peft_lora(x))


def test_ggpo_trains_with_the_trainer_callback_and_logs_its_noise_scale():
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    model = get_peft_model(tiny_llama(), SparseConfig(method="lora_ggpo", target_modules="all-linear"))
    ids = torch.randint(0, 128, (8, 10))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = transformers.TrainingArguments(
        output_dir="/tmp/ggpo_trainer", max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, max_grad_norm=1.0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    SparseCallback.attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "sparse/perturbation_std" in h]
    assert len(logged) == 3 and all(h["sparse/perturbation_std"] > 0 for h in logged)
    layer = next(iter(_adapted(model).values()))
    assert torch.is_tensor(layer.sparse_noise["default"][0])


def test_gradient_checkpointing_redraws_the_same_noise():
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 9))
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, SparseConfig(method="lora_ggpo", target_modules="all-linear", init_weights=False))
        SparseScheduler(model, None)
        model.train()
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_ggpo_refuses_a_config_without_low_rank_part():
    with pytest.raises(ValueError, match="r > 0"):
        SparseConfig(method="lora_ggpo", r=0, structure="unstructured")


def test_resuming_from_a_trainer_checkpoint_matches_the_uninterrupted_run(tmp_path):
    # the noise after the checkpoint has the interrupted run's seed and scale (the scale came from
    # gradients that the checkpoint does not hold, so the scheduler's state keeps it)
    from ..conftest import trainer_run_and_resume

    full, resumed = trainer_run_and_resume(
        tmp_path,
        lambda: SparseConfig(method="lora_ggpo", target_modules="all-linear", perturbation_sigma=0.3, perturbation_beta=1.0),
        examples=24, max_steps=6, save_steps=3,
    )
    assert full.keys() == resumed.keys() and full
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
