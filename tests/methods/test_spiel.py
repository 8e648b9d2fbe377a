"""SpIEL: drop-and-regrow of unstructured supports, checked against brute-force references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from peft import get_peft_model

import sparse_peft
from sparse_peft import SparseConfig, SparseScheduler, ops
from sparse_peft.regrowth import GradientProbe, drop_fraction, regrow, top_positions


def test_drop_fraction_follows_the_papers_policies():
    # values from the official schedule with T = 100 (see the method notes)
    assert drop_fraction(25, 100, 0.2, "linear") == pytest.approx(0.150)
    assert drop_fraction(45, 100, 0.2, "linear") == pytest.approx(0.110)
    assert drop_fraction(85, 100, 0.2, "linear") == pytest.approx(0.030)
    assert drop_fraction(5, 100, 0.2, "cosine") == pytest.approx(0.199, abs=1e-3)
    assert drop_fraction(65, 100, 0.2, "cosine") == pytest.approx(0.055, abs=1e-3)


def _reference_regrow(indices, values, n_drop, candidates, scores):
    """The rule in plain Python sets: drop the n smallest |v|, add the n best candidates not kept."""
    slots = sorted(range(len(indices)), key=lambda j: (abs(values[j]), j))
    kept = {indices[j] for j in slots[n_drop:]}
    ranked = sorted((c for c in zip(scores, candidates) if c[1] not in kept), reverse=True)
    grown = [pos for _, pos in ranked[:n_drop]]
    return sorted(kept | set(grown))


@pytest.mark.parametrize("seed", range(5))
def test_regrow_matches_a_set_reference(seed):
    g = torch.Generator().manual_seed(seed)
    numel, k, n_drop = 200, 30, 8
    indices = torch.randperm(numel, generator=g)[:k].sort().values
    values = torch.randn(k, generator=g)
    candidates = torch.randperm(numel, generator=g)[:40].sort().values  # may overlap the support
    scores = torch.rand(40, generator=g)
    result = regrow(indices, values, n_drop, candidates, scores)
    expected = _reference_regrow(indices.tolist(), values.tolist(), n_drop, candidates.tolist(), scores.tolist())
    assert result.indices.tolist() == expected
    # each slot that stays keeps its value; new slots are marked -1
    for slot, pos in enumerate(result.indices.tolist()):
        src = int(result.source[slot])
        if pos in indices.tolist():
            assert src == indices.tolist().index(pos)
        else:
            assert src == -1


def test_regrow_keeps_the_size_when_candidates_run_out():
    indices = torch.tensor([1, 4, 7, 9])
    values = torch.tensor([0.1, -2.0, 0.3, 0.05])
    result = regrow(indices, values, 3, torch.tensor([5]), torch.tensor([1.0]))
    # drops 9 (0.05), 1 (0.1), 7 (0.3); grows 5; the best dropped (7, then 1) come back to fill the size
    assert result.indices.tolist() == [1, 4, 5, 7]
    assert result.dropped == 1


@pytest.mark.parametrize("block", [1 << 22, 7])
def test_top_positions_streams_over_row_blocks(block, monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", block)
    scores = torch.randn(9, 5)
    exclude = torch.tensor([0, 3, 12, 44])
    pos, val = top_positions(lambda r0, r1: scores[r0:r1], 9, 5, 6, exclude)
    flat = scores.reshape(-1).clone()
    masked = flat.abs().clone()
    masked[exclude] = -1
    expected = masked.topk(6).indices.sort().values
    assert pos.tolist() == expected.tolist()
    assert torch.equal(val, flat[expected])


def test_gradient_probe_sums_the_gradient_at_the_first_batchs_top_candidates():
    torch.manual_seed(0)
    probe = GradientProbe(n_candidates=7)
    batches = [(torch.randn(6, 4), torch.randn(6, 5)) for _ in range(3)]
    for dy, x in batches:
        probe(dy, x)
    first = (batches[0][0].t() @ batches[0][1]).reshape(-1)
    expected_candidates = first.abs().topk(7).indices.sort().values
    assert probe.candidates.tolist() == expected_candidates.tolist()
    total = sum(dy.t() @ x for dy, x in batches).reshape(-1)
    assert torch.allclose(probe.sums, total[expected_candidates], atol=1e-5)


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 24, bias=False)

    def forward(self, x):
        return self.proj(x)


def _regression_run(regrowth, reselection_steps, steps=60, seed=0):
    """A student must learn a sparse change of its weight that its random start support mostly misses."""
    torch.manual_seed(seed)
    student = Teacher()
    target = copy.deepcopy(student)
    with torch.no_grad():
        hit = torch.randperm(24 * 24)[:24]
        target.proj.weight.view(-1)[hit] += 1.0
    # the regrowth knobs only with regrowth (with reselection_steps=0 they would be refused as unused)
    knobs = dict(accumulation_steps=2, initial_reselection_rate=0.5, regrowth=regrowth) if reselection_steps else {}
    config = SparseConfig(
        target_modules=["proj"], density=24 / (24 * 24), reselection_steps=reselection_steps, seed=seed, **knobs
    )
    model = get_peft_model(student, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    scheduler = SparseScheduler(model, optimizer, total_steps=steps)
    layer = model.base_model.model.proj
    history = []
    for _ in range(steps):
        x = torch.randn(64, 24)
        loss = (model(x) - target(x)).pow(2).mean()
        loss.backward()
        optimizer.step()
        stats = scheduler.step()
        optimizer.zero_grad()
        idx = layer.sparse_indices["default"]
        assert idx.numel() == 24 and idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())
        history.append(stats)
    x = torch.randn(256, 24)
    with torch.no_grad():
        final = (model(x) - target(x)).pow(2).mean().item()
    found = torch.isin(layer.sparse_indices["default"].long(), hit).sum().item()
    return final, found, history


def test_gradient_regrowth_finds_a_support_the_random_start_misses():
    fixed_loss, fixed_found, _ = _regression_run("gradient", reselection_steps=0)
    loss, found, history = _regression_run("gradient", reselection_steps=10)
    assert found > fixed_found + 8, (found, fixed_found)
    assert loss < 0.5 * fixed_loss, (loss, fixed_loss)
    logged = [h for h in history if h]
    assert logged and all(h["sparse/density"] == pytest.approx(24 / 576) for h in logged)


def test_optimizer_moments_follow_their_indices():
    torch.manual_seed(0)
    model = get_peft_model(Teacher(), SparseConfig(target_modules=["proj"], density=0.1, reselection_steps=4, accumulation_steps=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    scheduler = SparseScheduler(model, optimizer, total_steps=100)
    layer = model.base_model.model.proj
    values = layer.sparse_values["default"]
    checked = False
    for step in range(1, 7):
        model(torch.randn(16, 24)).pow(2).mean().backward()
        optimizer.step()
        before_idx = layer.sparse_indices["default"].clone()
        before = {k: v.clone() for k, v in optimizer.state[values].items() if torch.is_tensor(v) and v.shape == values.shape}
        before_vals = values.detach().clone()
        stats = scheduler.step()
        optimizer.zero_grad()
        if stats is None:
            continue
        after_idx = layer.sparse_indices["default"]
        assert stats["sparse/regrown"] > 0
        old = {int(p): j for j, p in enumerate(before_idx)}
        kept_slots = [old[p] for p in after_idx.tolist() if p in old]
        for j, p in enumerate(after_idx.tolist()):
            for key, moment in before.items():
                if p in old:
                    expected = moment[old[p]]
                else:  # new: zero, but the second moment takes the kept entries' mean
                    expected = moment[kept_slots].mean() if key == "exp_avg_sq" else 0.0
                assert torch.isclose(optimizer.state[values][key][j], torch.as_tensor(expected)), (key, p)
            assert values[j] == (before_vals[old[p]] if p in old else 0.0)
        checked = True
    assert checked


def test_the_first_gradient_reselection_replaces_the_random_start():
    torch.manual_seed(0)
    model = get_peft_model(Teacher(), SparseConfig(method="spiel", target_modules=["proj"], density=0.05))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = SparseScheduler(model, optimizer, total_steps=100)
    layer = model.base_model.model.proj
    start = layer.sparse_indices["default"].clone()
    for _ in range(5):  # SpIEL: accumulation_steps = 5
        model(torch.randn(16, 24)).pow(2).mean().backward()
        optimizer.step()
        stats = scheduler.step()
        optimizer.zero_grad()
    assert stats["sparse/drop_fraction"] == 1.0
    assert not torch.equal(start, layer.sparse_indices["default"])
    assert layer.sparse_probe == {}  # the window closed; the next opens at update 20


def test_trainer_callback_regrows_and_logs(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ..conftest import tiny_llama

    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (24, 12))]
    model = get_peft_model(
        tiny_llama().train(),
        SparseConfig(target_modules="all-linear", density=0.05, reselection_steps=3, accumulation_steps=2),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = sparse_peft.SparseCallback.attach(trainer)
    trainer.train()
    assert callback.scheduler.step_count == 6
    logged = [h for h in trainer.state.log_history if "sparse/churn" in h]
    assert [h["step"] for h in logged] == [2, 5]
    assert logged[0]["sparse/drop_fraction"] == 1.0 and logged[0]["sparse/regrown"] > 0


def test_momentum_regrowth_matches_a_brute_force_sm3_reference():
    """Accumulators by loops over the active entries; growth = best row × column score off the support."""
    torch.manual_seed(0)
    config = SparseConfig(target_modules=["proj"], density=0.1, reselection_steps=10, accumulation_steps=3, regrowth="momentum")
    model = get_peft_model(Teacher(), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = SparseScheduler(model, optimizer, total_steps=100)
    layer = model.base_model.model.proj
    values = layer.sparse_values["default"]
    row_acc, col_acc = [0.0] * 24, [0.0] * 24
    for step in range(1, 4):
        model(torch.randn(16, 24) * torch.linspace(0.1, 3, 24)).pow(2).mean().backward()
        grads, indices = values.grad.clone(), layer.sparse_indices["default"].tolist()
        before_values = values.detach() - 0.1 * grads  # the SGD update; the regrowth sees these values
        optimizer.step()  # the schedule runs in the optimizer's step hooks, right after the update
        u = [min(row_acc[p // 24], col_acc[p % 24]) + float(g) ** 2 for p, g in zip(indices, grads)]
        new_row, new_col = list(row_acc), list(col_acc)
        for p, uj in zip(indices, u):
            new_row[p // 24] = max(new_row[p // 24], uj)
            new_col[p % 24] = max(new_col[p % 24], uj)
        row_acc, col_acc = new_row, new_col
        stats = scheduler.step()
        optimizer.zero_grad()
    assert stats is not None
    n = int(len(indices) * stats["sparse/drop_fraction"])
    order = sorted(range(len(indices)), key=lambda j: (abs(float(before_values[j])), j))
    kept = {indices[j] for j in order[n:]}
    outside = [p for p in range(24 * 24) if p not in indices]
    grown = sorted(outside, key=lambda p: -row_acc[p // 24] * col_acc[p % 24])[:n]
    assert layer.sparse_indices["default"].tolist() == sorted(kept | set(grown))
    assert [len(a) for a in scheduler.hooks[0].momentum["base_model.model.proj"]] == [24, 24]  # O(rows + cols)


def _distill(reselection_steps, steps=60):
    """A tiny Llama learns a teacher that differs from it at a few entries of every projection."""
    from ..conftest import tiny_llama

    student, teacher = tiny_llama(seed=0), tiny_llama(seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                w = module.weight.view(-1)
                w[torch.randperm(w.numel(), generator=g)[: w.numel() // 50]] += 0.3
    knobs = dict(accumulation_steps=2) if reselection_steps else {}
    config = SparseConfig(target_modules="all-linear", density=0.02, reselection_steps=reselection_steps, seed=3, **knobs)
    model = get_peft_model(student, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02, weight_decay=0.0)
    scheduler = SparseScheduler(model, optimizer, total_steps=steps)
    data = torch.randint(0, 128, (steps + 1, 8, 16), generator=g)
    for batch in data[:-1]:
        with torch.no_grad():
            target = teacher(batch).logits
        (model(batch).logits - target).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return (model(data[-1]).logits - teacher(data[-1]).logits).pow(2).mean().item()


def test_tiny_llama_learns_more_with_regrowth_than_with_a_fixed_support():
    fixed, regrown = _distill(0), _distill(10)
    assert regrown < 0.7 * fixed, (regrown, fixed)


@pytest.mark.parametrize("regrowth", ["gradient", "momentum"])
def test_resuming_from_a_trainer_checkpoint_matches_the_uninterrupted_run(tmp_path, regrowth):
    """Checkpoint at step 5, inside an accumulation window (R=4, A=3: windows 1-3 and 5-7)."""
    from ..conftest import trainer_run_and_resume

    full, resumed = trainer_run_and_resume(
        tmp_path,
        lambda: SparseConfig(target_modules="all-linear", density=0.05, reselection_steps=4, accumulation_steps=3, regrowth=regrowth),
        examples=32, max_steps=8, save_steps=5,
    )
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-6), key


@pytest.mark.parametrize("setting", ["gradient-checkpointing", "bf16", "4-bit"])
def test_regrowth_under_checkpointing_bf16_and_a_4bit_base(setting, tmp_path):
    from ..conftest import tiny_llama

    torch.manual_seed(0)
    if setting == "4-bit":
        pytest.importorskip("bitsandbytes")
        from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"})
    else:
        base = tiny_llama().train()
        if setting == "bf16":
            base = base.to(torch.bfloat16)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = SparseConfig(target_modules="all-linear", density=0.05, reselection_steps=3, accumulation_steps=2)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = SparseScheduler(model, optimizer, total_steps=10)
    start = {n: m.sparse_indices["default"].clone() for n, m in scheduler.layers.items()}
    for _ in range(5):
        ids = torch.randint(0, 128, (2, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert all(not torch.equal(start[n], m.sparse_indices["default"]) for n, m in scheduler.layers.items())
    assert all(m.sparse_values["default"].dtype == torch.float32 for m in scheduler.layers.values())


def test_a_total_budget_is_spread_over_the_targets_by_size(tmp_path):
    from peft import PeftModel

    from ..conftest import tiny_llama

    model = get_peft_model(tiny_llama(), SparseConfig(target_modules="all-linear", num_trainable=3000))
    layers = [m for m in model.modules() if isinstance(m, sparse_peft.SparseLayer)]
    sizes = [m.out_features * m.in_features for m in layers]
    counts = [m.sparse_values["default"].numel() for m in layers]
    assert abs(sum(counts) - 3000) <= len(layers)
    for size, count in zip(sizes, counts):
        assert count == pytest.approx(3000 * size / sum(sizes), abs=1)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert sum(m.sparse_values["default"].numel() for m in reloaded.modules() if isinstance(m, sparse_peft.SparseLayer)) == sum(counts)


def test_sm3_matches_a_hand_written_update_and_feeds_momentum_regrowth():
    torch.manual_seed(0)
    config = SparseConfig(target_modules=["proj"], density=0.1, reselection_steps=4, accumulation_steps=2, regrowth="momentum")
    model = get_peft_model(Teacher(), config)
    optimizer = sparse_peft.SparseSM3(model, lr=0.1, weight_decay=0.01)
    scheduler = SparseScheduler(model, optimizer, total_steps=20)
    layer = model.base_model.model.proj
    values = layer.sparse_values["default"]
    row, col = torch.zeros(24), torch.zeros(24)
    for step in range(4):
        model(torch.randn(16, 24)).pow(2).mean().backward()
        p, g, idx = values.detach().clone(), values.grad.clone(), layer.sparse_indices["default"].long()
        expected = p.clone()
        for j, (pos, gj) in enumerate(zip(idx.tolist(), g.tolist())):
            u = min(float(row[pos // 24]), float(col[pos % 24])) + gj * gj
            expected[j] = p[j] * (1 - 0.1 * 0.01) - 0.1 * gj / (u + 1e-30) ** 0.5
        u_all = torch.minimum(row[idx // 24], col[idx % 24]) + g * g
        for j, pos in enumerate(idx.tolist()):
            row[pos // 24] = max(row[pos // 24], u_all[j])
            col[pos % 24] = max(col[pos % 24], u_all[j])
        optimizer.step()  # the update, then (step 2) the regrowth, in the optimizer's step hooks
        # every position still in the support holds its hand-computed update
        expected_at = dict(zip(idx.tolist(), expected.tolist()))
        for j, pos in enumerate(layer.sparse_indices["default"].tolist()):
            if pos in expected_at:
                assert abs(float(values[j]) - expected_at[pos]) < 1e-6
        assert step + 1 != 2 or scheduler.step()["sparse/regrown"] > 0
        optimizer.zero_grad()
    state = optimizer.state[values]
    assert torch.allclose(state["row"], row) and torch.allclose(state["col"], col)
    # O(rows + cols) state, shared with the regrowth schedule rather than copied
    assert scheduler.hooks[0].momentum["base_model.model.proj"][0] is state["row"]
    assert sum(t.numel() for t in state.values()) == 48


@pytest.mark.parametrize("seed", range(4))
def test_top_positions_replaces_kept_entries_in_place_exactly(seed, monkeypatch):
    # once n are kept, entering entries take the slots of the weakest kept ones: still the exact top-n
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 4 * 20 * 3)  # blocks of 3 rows
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(50, 20, generator=g) * torch.linspace(0.1, 3, 50)[:, None]  # later rows stronger
    exclude = torch.randperm(1000, generator=g)[:40].sort().values
    pos, val = top_positions(lambda r0, r1: scores[r0:r1], 50, 20, 37, exclude)
    masked = scores.reshape(-1).abs().clone()
    masked[exclude] = -1
    expected = masked.topk(37).indices.sort().values
    assert pos.tolist() == expected.tolist()
    assert torch.equal(val, scores.reshape(-1)[expected])


@pytest.mark.parametrize("seed", range(3))
def test_top_positions_of_nonnegative_scores_in_int32_are_the_same_top_n(seed, monkeypatch):
    # RoSA's pool: sums of squares (no |·| copy needed) and int32 positions (the pool it keeps is 8 bytes a slot)
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 4 * 20 * 3)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(50, 20, generator=g).square() * torch.linspace(0.1, 3, 50)[:, None]
    exclude = torch.randperm(1000, generator=g)[:40].sort().values
    pos, val = top_positions(lambda r0, r1: scores[r0:r1].clone(), 50, 20, 37, exclude)
    pos32, val32 = top_positions(lambda r0, r1: scores[r0:r1].clone(), 50, 20, 37, exclude, nonnegative=True, int32=True)
    assert pos32.dtype == torch.int32 and pos.dtype == torch.int64
    assert pos32.tolist() == pos.tolist() and torch.equal(val32, val)
