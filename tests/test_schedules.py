"""A method's per-step work runs with no user action: in a plain loop (the optimizer's step hooks),
in the HF Trainer and in TRL (the default callback), exactly once per optimizer step."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import sparse_peft
from sparse_peft import SparseCallback, SparseConfig, SparseLayer, SparseScheduler

from .conftest import tiny_llama


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 12), generator=g) for _ in range(n)]


def _optimizer(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


# -- a plain loop ------------------------------------------------------------------------------------
def test_spiel_in_a_plain_loop_without_the_runs_length_refuses_the_first_step_with_the_fix():
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="spiel", target_modules="all-linear"))
    opt = _optimizer(model)
    x = _batches(1)[0]
    model(x, labels=x).loss.backward()
    before = {k: v.clone() for k, v in model.state_dict().items() if "sparse_values" in k}
    with pytest.raises(RuntimeError, match=r"regrowth schedule needs the run's total number of optimizer steps.*"
                                           r"SparseScheduler\(model, optimizer, total_steps=N\)"):
        opt.step()
    # refused before the update: nothing trained without its schedule
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_spiel_regrows_in_a_plain_loop_that_never_calls_the_scheduler():
    model = get_peft_model(tiny_llama().train(), SparseConfig(
        method="spiel", target_modules="all-linear", reselection_steps=3, accumulation_steps=2))
    opt = _optimizer(model)
    scheduler = SparseScheduler(model, opt, total_steps=8)  # made once; never called by hand
    start = {n: m.sparse_indices["default"].clone() for n, m in _layers(model).items()}
    for t, x in enumerate(_batches(6), start=1):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = any(not torch.equal(start[n], m.sparse_indices["default"]) for n, m in _layers(model).items())
        assert moved == (t >= 2), t  # first reselection after update A = 2
    assert scheduler.step_count == 6


def test_ggpo_draws_new_noise_each_step_from_the_last_gradients_with_nothing_attached():
    # a large β, so that the gradient term (β·‖∇W'‖²) shows beside the weight norms in float32
    config = SparseConfig(method="lora_ggpo", target_modules="all-linear", perturbation_beta=1e4)
    model = get_peft_model(tiny_llama().train(), config)
    opt = _optimizer(model)
    layer = next(iter(_layers(model).values()))
    seeds, stds = [layer.sparse_noise["default"][1]], [layer.sparse_noise["default"][0].clone()]
    for x in _batches(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        seeds.append(layer.sparse_noise["default"][1])
        stds.append(layer.sparse_noise["default"][0].clone())
    assert len(set(seeds)) == 4  # a seed per step
    assert not torch.equal(stds[0], stds[1])  # step 1's gradients enter step 2's scale (Eq. 8)


def test_sara_adds_its_penalty_into_the_gradient_and_freezes_with_nothing_attached():
    config = SparseConfig(method="sara", target_modules=["q_proj", "v_proj"], nuclear_norm_layers=4, progressive_step=2)
    model = get_peft_model(tiny_llama().train(), config)
    layers = _layers(model)
    with torch.no_grad():  # a non-zero update, so that the penalty has directions to push
        for m in layers.values():
            m.sparse_values["default"].normal_(0, 1e-2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: only gradients change
    x = _batches(1)[0]
    model(x, labels=x).loss.backward()
    expected = {}
    for n, m in layers.items():  # the loss gradient plus λ·U·Vᵀ of ΔW at the support (SaRA's subgradient)
        delta = m.get_delta("default")
        dense = delta.dense(torch.float32).detach().requires_grad_()
        subgradient, = torch.autograd.grad(torch.linalg.matrix_norm(dense, "nuc"), dense)  # torch's own, dense
        rows, cols = delta.rows_cols()
        expected[n] = m.sparse_values["default"].grad + 5e-4 * subgradient[rows, cols]
    opt.step()
    for n, m in layers.items():
        torch.testing.assert_close(m.sparse_values["default"].grad, expected[n])
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()  # step 2: the progressive step
    assert all("default" in m.sparse_frozen_slots for m in layers.values())


def test_sara_with_a_fractional_progressive_step_refuses_a_loop_that_gives_no_length():
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="sara", target_modules="all-linear"))
    opt = _optimizer(model)
    x = _batches(1)[0]
    model(x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match=r"progressive_step=0.5 as a fraction of the run.*total_steps=N"):
        opt.step()


def test_calling_the_scheduler_by_hand_as_well_runs_each_step_once():
    config = SparseConfig(method="spiel", target_modules="all-linear", reselection_steps=3, accumulation_steps=1)
    runs = []
    for by_hand in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama().train(), config)
        opt = _optimizer(model)
        scheduler = SparseScheduler(model, opt, total_steps=10)
        stats = []
        for x in _batches(5):
            model(x, labels=x).loss.backward()
            if by_hand:
                scheduler.before_optimizer_step()
            opt.step()
            if by_hand:
                stats.append(scheduler.step())
            opt.zero_grad()
        assert scheduler.step_count == 5
        runs.append({k: v.clone() for k, v in model.state_dict().items() if "sparse_" in k})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert [s is not None and "sparse/churn" in s for s in stats] == [True, False, False, True, False]


def test_a_copy_of_a_model_runs_its_own_schedule():
    import copy

    model = get_peft_model(tiny_llama().train(), SparseConfig(method="lora_ggpo", target_modules="all-linear"))
    twin = copy.deepcopy(model)
    opt = _optimizer(twin)
    layer = next(iter(_layers(twin).values()))
    seed = layer.sparse_noise["default"][1]
    x = _batches(1)[0]
    twin(x, labels=x).loss.backward()
    opt.step()
    assert layer.sparse_noise["default"][1] != seed  # the copy's steps refresh its own noise


def test_training_that_never_reaches_the_schedule_is_reported(monkeypatch):
    import sparse_peft.schedule as schedule

    monkeypatch.setattr(schedule, "UNSTEPPED_FORWARDS", 3)
    model = get_peft_model(tiny_llama().train(), SparseConfig(method="lora_ggpo", target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.warns(UserWarning, match="3 training forwards and its method's per-step work has not run"):
        for x in _batches(3):  # an update no torch optimizer makes: its step hooks never fire
            model(x, labels=x).loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= 0.01 * p.grad
                    p.grad = None


def test_an_adapter_loaded_for_inference_has_no_schedule():
    model = get_peft_model(tiny_llama(), SparseConfig(method="lora_ggpo", target_modules="all-linear"))
    assert all("default" in m.sparse_noise for m in _layers(model).values())
    frozen = get_peft_model(tiny_llama(), SparseConfig(method="lora_ggpo", target_modules="all-linear", inference_mode=True))
    assert not any(m.sparse_noise for m in _layers(frozen).values())


# -- the HF Trainer ----------------------------------------------------------------------------------
def _trainer(model, tmp_path, callbacks=None, steps=4):
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (16, 12))]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


@pytest.mark.parametrize("method, stat", [("spiel", "sparse/churn"), ("sara", "sparse/nuclear_norm"),
                                          ("lora_ggpo", "sparse/perturbation_std")])
def test_the_trainer_runs_every_schedule_with_no_callback_attached(tmp_path, method, stat):
    extra = dict(reselection_steps=2, accumulation_steps=1) if method == "spiel" else {}
    model = get_peft_model(tiny_llama().train(), SparseConfig(method=method, target_modules="all-linear", **extra))
    start = {n: m.sparse_indices["default"].clone() for n, m in _layers(model).items() if "default" in m.sparse_indices}
    trainer = _trainer(model, tmp_path)
    trainer.train()
    assert any(stat in h for h in trainer.state.log_history)
    scheduler = SparseCallback.attach(trainer).scheduler  # the default callback: attach returns it
    assert scheduler.step_count == 4 and scheduler.total == 4
    if method == "spiel":
        assert any(not torch.equal(start[n], m.sparse_indices["default"]) for n, m in _layers(model).items())
    if method == "sara":  # progressive step at half of the run
        assert all("default" in m.sparse_frozen_slots for m in _layers(model).values())


def test_a_callback_passed_beside_the_default_one_does_not_double_the_work(tmp_path):
    config = SparseConfig(method="spiel", target_modules="all-linear", reselection_steps=2, accumulation_steps=1)
    model = get_peft_model(tiny_llama().train(), config)
    mine = SparseCallback()
    trainer = _trainer(model, tmp_path, callbacks=[mine])
    assert sum(isinstance(c, SparseCallback) for c in trainer.callback_handler.callbacks) == 2
    assert SparseCallback.attach(trainer) is not mine  # the default one, first in the list
    trainer.train()
    assert mine.scheduler.step_count == 4
    churn_steps = [h["step"] for h in trainer.state.log_history if "sparse/churn" in h]
    assert churn_steps == [1, 3]


def test_a_trainer_without_a_sparse_adapter_is_left_alone(tmp_path):
    from peft import LoraConfig

    model = get_peft_model(tiny_llama().train(), LoraConfig(target_modules=["q_proj"]))
    trainer = _trainer(model, tmp_path, steps=1)
    trainer.train()
    assert SparseCallback.attach(trainer).scheduler is None
    assert sparse_peft.SparseCallback in __import__("transformers").trainer.DEFAULT_CALLBACKS
