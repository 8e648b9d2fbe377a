"""SaRA: smallest-magnitude supports, the nuclear-norm penalty, the progressive step, Conv2d U-Nets."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
import torch.nn as nn
from peft import PeftModel, get_peft_model

import sparse_peft
from sparse_peft import SparseConfig, SparseLayer, SparseScheduler
from sparse_peft.delta import Delta
from sparse_peft.methods.sara import nuclear_factors

from ..conftest import tiny_llama


def _adapted(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


class TinyUNetBlock(nn.Module):
    """The module layout of a diffusers U-Net block: convolutions and attention linears by their names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.attn = nn.ModuleDict(
            dict(to_q=nn.Linear(8, 8, bias=False), to_k=nn.Linear(8, 8, bias=False), to_v=nn.Linear(8, 8, bias=False),
                 to_out=nn.ModuleList([nn.Linear(8, 8)]))
        )
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)  # (b, tokens, c)
        q, k, v = self.attn["to_q"](t), self.attn["to_k"](t), self.attn["to_v"](t)
        a = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        t = t + self.attn["to_out"][0](a)
        return self.conv_out(t.transpose(1, 2).reshape(b, c, hh, ww))


UNET_TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0", "conv_out"]


def test_fraction_support_is_each_layers_smallest_weights():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="sara", target_modules="all-linear"))
    for name, layer in _adapted(model).items():
        w = layer.get_base_layer().weight.detach().abs().reshape(-1)
        k = layer.sparse_values["default"].numel()
        assert k == round(0.01 * w.numel())
        expected = torch.topk(w, k, largest=False).indices.sort().values
        assert torch.equal(layer.sparse_indices["default"].long(), expected)


def test_absolute_threshold_takes_every_weight_below_it():
    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), SparseConfig(method="sara", threshold=2e-3, target_modules="all-linear"))
    sizes = set()
    for layer in _adapted(model).values():
        w = layer.get_base_layer().weight.detach().abs().reshape(-1)
        assert torch.equal(layer.sparse_indices["default"].long(), (w < 2e-3).nonzero().squeeze(1))
        sizes.add(layer.sparse_values["default"].numel())
    assert len(sizes) > 1  # the count follows each layer's weights
    with pytest.raises(ValueError, match="small_magnitude"):
        SparseConfig(method="sara", threshold=2e-3, selection="random")


def test_nuclear_factors_give_the_gradient_of_the_nuclear_norm():
    m = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    everywhere = Delta(7, 5, values=m.detach().flatten(), indices=torch.arange(35, dtype=torch.int32))
    norm, u, vh = nuclear_factors(everywhere)
    torch.linalg.matrix_norm(m, "nuc").backward()
    assert norm == pytest.approx(float(torch.linalg.matrix_norm(m.detach(), "nuc")), rel=1e-5)
    torch.testing.assert_close(u @ vh, m.grad.float(), atol=1e-5, rtol=1e-4)
    # read at a support, never formed: the same as the dense subgradient there, scaled, frozen slots left out
    flat = torch.tensor([0, 3, 8, 20, 34], dtype=torch.int32)
    part = Delta(7, 5, values=m.detach().flatten()[flat.long()], indices=flat, sparse_scale=2.0,
                 frozen_slots=torch.tensor([1], dtype=torch.int32), frozen_values=torch.zeros(1, dtype=torch.float64))
    got = part.factor_grad_parts(u, vh)["sparse_values"]
    want = 2.0 * (u @ vh).flatten()[flat.long()]
    want[1] = 0
    torch.testing.assert_close(got, want)
    # at zero every direction is free: no push
    zero = Delta(4, 3, values=torch.zeros(12), indices=torch.arange(12, dtype=torch.int32))
    assert nuclear_factors(zero)[1].numel() == 0


def test_low_rank_nuclear_factors_form_nothing_of_the_weights_size():
    # nuclear_norm_rank: a randomized SVD of the sparse matrix itself; its top singular values approach the dense one's
    from sparse_peft.memory import peak_memory

    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(2752 * 1024, generator=g)[:30_000].sort().values.int()
    delta = Delta(2752, 1024, values=torch.randn(30_000, generator=g), indices=flat)
    with peak_memory("cpu") as peak:
        norm, u, vh = nuclear_factors(delta, rank=8)
        delta.factor_grad_parts(u, vh)
    # two chunks of ≤ 1 MiB (the factors' rows gathered at the support) and O(k) indices: a third of the
    # fp32 weight here, where the full SVD's dense ΔW, U, Vᵀ and workspace come to ~3.4 weights
    assert peak.bytes < 0.4 * 2752 * 1024 * 4
    top = torch.linalg.svdvals(delta.dense())[:8]
    assert norm <= float(top.sum()) * 1.001 and norm > 0.8 * float(top.sum())


def _train(config, steps=12, batches=None, base=None, accumulation=1, extra_steps=0):
    torch.manual_seed(0)
    model = get_peft_model(base if base is not None else tiny_llama(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.01)
    scheduler = SparseScheduler(model, opt, total_steps=steps)
    g = torch.Generator().manual_seed(1)
    history = []
    for t in range(steps + extra_steps):
        for _ in range(accumulation):
            x = torch.randint(0, 128, (4, 12), generator=g)
            (model(x, labels=x).loss / accumulation).backward()
        stats = scheduler.before_optimizer_step() or {}
        opt.step()
        stats.update(scheduler.step() or {})
        opt.zero_grad()
        history.append(stats)
    return model, opt, history


def _nuclear(model):
    return sum(
        float(torch.linalg.matrix_norm(layer.get_delta("default").dense().detach().double(), "nuc"))
        for layer in _adapted(model).values()
    )


def test_nuclear_norm_penalty_lowers_the_updates_nuclear_norm():
    common = dict(method="sara", target_modules="all-linear", density=0.05, progressive_step=0)
    plain, _, _ = _train(SparseConfig(nuclear_norm_weight=0.0, **common))
    penalised, _, history = _train(SparseConfig(nuclear_norm_weight=0.05, nuclear_norm_layers=14, **common))
    assert "sparse/nuclear_norm" in history[-1]
    assert _nuclear(penalised) < 0.9 * _nuclear(plain)
    # the randomized-SVD variant still penalises
    lowrank, _, _ = _train(SparseConfig(nuclear_norm_weight=0.05, nuclear_norm_layers=14, nuclear_norm_rank=2, **common))
    assert _nuclear(lowrank) < _nuclear(plain)


def test_progressive_step_freezes_entries_above_the_threshold_at_their_values():
    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=4)
    model, opt, history = _train(config, steps=5)
    assert "sparse/progressive_kept" in history[3] and 0 < history[3]["sparse/progressive_kept"] < 1
    for layer in _adapted(model).values():
        slots = layer.sparse_frozen_slots["default"].long()
        values = layer.sparse_values["default"]
        assert bool((values.detach()[slots] == 0).all())  # the trainable slots of frozen entries stay empty
        state = opt.state[values]
        assert bool((state["exp_avg"][slots] == 0).all())
        # the layer's threshold is the largest |w| the selection took; frozen entries are at or above it
        rows, cols = layer.get_delta("default").rows_cols()
        w0 = layer.get_base_layer().weight.detach()[rows, cols]
        limit = w0.abs().max()
        frozen_w = w0[slots] + layer.sparse_frozen_values["default"]
        assert bool((frozen_w.abs() >= limit).all())


def test_frozen_entries_keep_their_values_while_the_rest_trains():
    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=3)
    model, opt, _ = _train(config, steps=3)
    layers = _adapted(model)
    frozen = {n: m.sparse_frozen_values["default"].clone() for n, m in layers.items()}
    effective = {n: m.get_delta("default").effective_values().detach().clone() for n, m in layers.items()}
    x = torch.randint(0, 128, (4, 12))
    for _ in range(3):  # AdamW with weight decay, momentum still warm from before the freeze
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = 0
    for name, layer in layers.items():
        slots = layer.sparse_frozen_slots["default"].long()
        now = layer.get_delta("default").effective_values().detach()
        assert torch.equal(now[slots], frozen[name]) and torch.equal(now[slots], effective[name][slots])
        free = torch.ones(now.numel(), dtype=torch.bool)
        free[slots] = False
        moved += int((now[free] != effective[name][free]).sum())
    assert moved > 0


def test_progressive_adapter_saves_and_reloads_with_its_frozen_entries():
    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=2)
    model, _, _ = _train(config, steps=4)
    model.eval()
    x = torch.randint(0, 128, (2, 9))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(tiny_llama(), folder)
        assert torch.equal(loaded(x).logits, model(x).logits)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(x).logits, model(x).logits, atol=1e-5)


def test_gradient_accumulation_works():
    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=2)
    model, _, history = _train(config, steps=3, accumulation=3)
    assert "sparse/progressive_kept" in history[1]


def test_unet_conv_and_attention_layers_train_with_the_penalty_and_progressive_step():
    torch.manual_seed(0)
    base = TinyUNetBlock()
    config = SparseConfig(method="sara", target_modules=UNET_TARGETS, density=0.1, nuclear_norm_layers=7, progressive_step=3)
    model = get_peft_model(copy.deepcopy(base), config)
    assert {type(m).__name__ for m in _adapted(model).values()} == {"Conv2d", "Linear"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = SparseScheduler(model, opt, total_steps=6)
    x, target = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    losses = []
    for _ in range(6):
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        stats = scheduler.before_optimizer_step()
        assert stats["sparse/nuclear_norm"] >= 0
        opt.step()
        scheduler.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    conv = _adapted(model)["base_model.model.conv1"]
    assert "default" in conv.sparse_frozen_slots
    # merged conv weight = W + ΔW, checked against the layer's own output
    model.eval()
    expected = model(x)
    merged = model.merge_and_unload()
    assert torch.allclose(merged(x), expected, atol=1e-5)


def test_sara_config_checks():
    with pytest.raises(ValueError, match="progressive_step"):
        SparseConfig(method="sara", progressive_step=-1)
    with pytest.raises(ValueError, match="reselection_steps"):
        SparseConfig(method="sara", reselection_steps=10)
    with pytest.raises(ValueError, match="nuclear_norm_weight"):
        SparseConfig(method="sara", nuclear_norm_weight=-1.0)
    model = get_peft_model(tiny_llama(), SparseConfig(method="sara", target_modules="all-linear"))
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        SparseScheduler(model, None, total_steps=None)


def _frozen_state(model):
    return {n: (m.sparse_frozen_slots["default"].clone(), m.sparse_frozen_values["default"].clone(),
                m.sparse_values["default"].detach().clone()) for n, m in _adapted(model).items()}


def test_files_hold_frozen_slots_as_one_bit_per_value_and_reload_them_exactly(tmp_path):
    from safetensors.torch import load_file

    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=2)
    model, _, _ = _train(config, steps=4)
    model.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("frozen_slots" in k or "frozen_values" in k for k in tensors)
    masks = {k: t for k, t in tensors.items() if k.endswith("sparse_frozen_mask")}
    assert masks and all(t.dtype == torch.uint8 for t in masks.values())
    for key, mask in masks.items():
        values = tensors[key.replace("sparse_frozen_mask", "sparse_values")]
        assert mask.numel() == (values.numel() + 7) // 8
    # the frozen values are in sparse_values, where the trainable tensor holds zeros
    before = _frozen_state(model)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    after = _frozen_state(loaded)
    assert before.keys() == after.keys()
    for name in before:
        for b, a in zip(before[name], after[name]):
            assert torch.equal(b, a.to(b.dtype)), name


def test_files_in_the_older_layout_with_frozen_slots_and_values_still_load(tmp_path, monkeypatch):
    from sparse_peft import files

    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=2)
    model, _, _ = _train(config, steps=4)
    model.eval()
    monkeypatch.setattr(files, "pack_frozen", lambda state_dict: state_dict)  # write as versions before 0.x did
    model.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    x = torch.randint(0, 128, (2, 9))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("damage", ["length", "dtype", "padding"])
def test_a_corrupt_frozen_mask_is_refused_and_the_model_left_as_it_was(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    config = SparseConfig(method="sara", target_modules="all-linear", density=0.05, progressive_step=2)
    model, _, _ = _train(config, steps=4)
    model.save_pretrained(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("sparse_frozen_mask"))
    mask = tensors[key]
    n = tensors[key.replace("sparse_frozen_mask", "sparse_values")].numel()
    if damage == "length":
        tensors[key] = mask[:-1]
    elif damage == "dtype":
        tensors[key] = mask.to(torch.int32)
    else:
        assert n % 8, "the test needs a partly used last byte"
        tensors[key] = mask.clone()
        tensors[key][-1] |= 0x80
    save_file(tensors, path)
    base = tiny_llama()
    with pytest.raises(ValueError, match="sparse_frozen_mask"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert not any(isinstance(m, SparseLayer) for m in base.modules())


def _svd_subgradient(dense: torch.Tensor) -> tuple[float, torch.Tensor]:
    """float64 reference: ‖ΔW‖_* and U·Vᵀ over the non-zero singular values, from torch's full SVD."""
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    keep = s > s.max() * 1e-9 if s.max() > 0 else s < 0
    return float(s.sum()), u[:, keep] @ vh[keep]


@pytest.mark.parametrize("shape, k, rows_only", [((300, 120), 2000, None), ((120, 300), 2000, None),
                                                 ((200, 200), 3000, None), ((300, 120), 600, 6)])
def test_the_gram_subgradient_equals_the_full_svds(shape, k, rows_only):
    # tall, wide, square, and rank-deficient (entries in 6 rows only: empty rows and columns are left out of the
    # Gram, or eigh would face hundreds of repeated zero eigenvalues)
    from sparse_peft.methods.sara import nuclear_subgradient

    g = torch.Generator().manual_seed(1)
    out_f, in_f = shape
    pool = out_f * in_f if rows_only is None else rows_only * in_f
    flat = torch.randperm(pool, generator=g)[:k].sort().values
    if rows_only is not None:
        chosen = torch.randperm(out_f, generator=g)[:rows_only].sort().values
        flat = (chosen[flat // in_f] * in_f + flat % in_f).sort().values
    values = torch.randn(k, generator=g) * 1e-3
    values[::7] = 0  # zero-valued entries read the subgradient too
    delta = Delta(out_f, in_f, values=values, indices=flat.int(), sparse_scale=2.0,
                  frozen_slots=torch.tensor([3], dtype=torch.int32), frozen_values=torch.zeros(1))
    dense = delta.dense(torch.float64)
    norm, parts = nuclear_subgradient(delta, gram_above=0)  # these small layers would take the SVD
    want_norm, want = _svd_subgradient(dense)
    assert norm == pytest.approx(want_norm, rel=1e-5)
    want = 2.0 * want.flatten()[flat]
    want[3] = 0
    # a square random ΔW has a few singular values near 1e-4 · σ_max, which fp32's Gram leaves out or blurs
    tol = 2e-2 if out_f == in_f else 1e-4
    got = parts["sparse_values"].double()
    assert (got - want).norm() <= tol * want.norm()


def test_the_gram_subgradient_forms_nothing_of_the_weights_size():
    from sparse_peft.memory import peak_memory
    from sparse_peft.methods.sara import nuclear_subgradient

    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(2752 * 1024, generator=g)[:30_000].sort().values.int()
    delta = Delta(2752, 1024, values=torch.randn(30_000, generator=g), indices=flat)
    with peak_memory("cpu") as peak:
        norm, parts = nuclear_subgradient(delta)
    # the 1024 × 1024 Gram, eigh's eigenvectors and workspace: four of 1024 × 1024, 1.5 of this fp32 weight,
    # where the full SVD of the dense ΔW comes to ~3.4
    assert peak.bytes < 1.6 * 2752 * 1024 * 4
    assert norm == pytest.approx(float(torch.linalg.svdvals(delta.dense()).sum()), rel=1e-4)
    zero = Delta(40, 30, values=torch.zeros(50), indices=torch.arange(0, 100, 2, dtype=torch.int32))
    norm, parts = nuclear_subgradient(zero, gram_above=0)
    assert norm == 0 and not parts["sparse_values"].any()


def test_the_gram_subgradient_falls_back_to_the_svd_with_a_warning(monkeypatch):
    # eigh failing to converge (many repeated eigenvalues) is said, and the step takes the exact full SVD instead
    from sparse_peft.methods import sara

    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(300 * 120, generator=g)[:2000].sort().values.int()
    delta = Delta(300, 120, values=torch.randn(2000, generator=g) * 1e-3, indices=flat)

    def fails(_):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    with pytest.warns(UserWarning, match="eigh did not converge on a 300 x 120 update"):
        norm, parts = sara.nuclear_subgradient(delta, gram_above=0)
    want_norm, want_parts = sara._by_svd(delta)
    assert norm == want_norm
    torch.testing.assert_close(parts["sparse_values"], want_parts["sparse_values"])
