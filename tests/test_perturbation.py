"""LoRA-GGPO's perturbation: the row norms against dense float64 math, and the perturbed layer's
forward, backward, regeneration from the seed, and what it saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.utils.checkpoint import checkpoint

from sparse_peft import perturbation as P

from .largest import LargestCreated


OUT, IN, R = 24, 40, 4
D = torch.float64


def _lora(dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, ga, gb = (torch.randn(*shape, generator=g, dtype=dtype) for shape in [(R, IN), (OUT, R), (R, IN), (OUT, R)])
    return a, b, ga, gb


def _z(seed, shape=(OUT, IN)):
    """The noise drawn independently of the code under test."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


# --- the norms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [None, 1, 5])
def test_row_sq_norms_match_dense(dtype, block_rows, monkeypatch):
    if block_rows:
        monkeypatch.setattr(P, "_ROW_BLOCK_ELEMENTS", block_rows * IN)
    w = torch.randn(OUT, IN).to(dtype)
    got = P.row_sq_norms(w)
    assert got.dtype == torch.float32 and got.shape == (OUT,)
    torch.testing.assert_close(got.double(), (w.double() ** 2).sum(1), rtol=1e-5, atol=0)
    # a transposed view, as for a Conv1D weight stored (in × out)
    torch.testing.assert_close(P.row_sq_norms(w.t().contiguous().t()), got)


def test_row_sq_norms_convert_one_block_at_a_time(monkeypatch):
    monkeypatch.setattr(P, "_ROW_BLOCK_ELEMENTS", 3 * IN)
    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    with LargestCreated() as seen:
        P.row_sq_norms(w)
    assert seen.largest[torch.float32] <= 3 * IN


def test_low_rank_row_sq_norms_match_dense():
    a, b, _, _ = _lora()
    dense = 0.7 * b @ a
    torch.testing.assert_close(P.low_rank_row_sq_norms(a, b, 0.7), (dense**2).sum(1))
    a16, b16 = a.bfloat16(), b.bfloat16()
    got32 = P.low_rank_row_sq_norms(a16, b16, 0.7)  # accumulated in fp32, not bf16
    assert got32.dtype == torch.float32
    dense16 = 0.7 * b16.double() @ a16.double()
    torch.testing.assert_close(got32.double(), (dense16**2).sum(1), rtol=1e-5, atol=1e-6)


def test_low_rank_grad_row_sq_norms_match_dense():
    a, b, ga, gb = _lora()
    s = 1.3
    for grad_a, grad_b in [(ga, gb), (ga, None), (None, gb)]:
        dense = s * (b @ (ga if grad_a is not None else 0 * a) + (gb if grad_b is not None else 0 * b) @ a)
        got = P.low_rank_grad_row_sq_norms(a, b, grad_a, grad_b, s)
        torch.testing.assert_close(got, (dense**2).sum(1))
    assert torch.equal(P.low_rank_grad_row_sq_norms(a, b, None, None, s), torch.zeros(OUT, dtype=D))


def test_norms_never_form_an_out_by_in_tensor():
    a, b, ga, gb = _lora(torch.float32)
    with LargestCreated() as seen:
        P.ggpo_row_std(torch.ones(OUT), a, b, ga, gb, 2.0)
    assert seen.most(floating=False)[0] <= max(OUT, IN) * R < OUT * IN


def test_ggpo_row_std_formula():
    a, b, ga, gb = _lora()
    w0 = torch.randn(OUT, IN, dtype=D)
    s, sigma, beta = 0.5, 0.05, 0.2
    w_prime_sq = (w0**2).sum(1) + ((s * b @ a) ** 2).sum(1)  # Eq. 7
    grad_sq = ((s * (b @ ga + gb @ a)) ** 2).sum(1)  # Eq. 8
    expected = torch.sqrt(sigma**2 / IN * (w_prime_sq + beta * grad_sq))
    got = P.ggpo_row_std(P.row_sq_norms(w0), a, b, ga, gb, s, sigma=sigma, beta=beta)
    torch.testing.assert_close(got, expected)
    # first step: no gradients yet, so no β term; the defaults are σ = 0.03, β = 0.01
    first = P.ggpo_row_std(P.row_sq_norms(w0), a, b, None, None, s)
    torch.testing.assert_close(first, torch.sqrt(0.03**2 / IN * w_prime_sq))
    default = P.ggpo_row_std(P.row_sq_norms(w0), a, b, ga, gb, s)
    torch.testing.assert_close(default, torch.sqrt(0.03**2 / IN * (w_prime_sq + 0.01 * grad_sq)))
    # a constant of the step: no autograd history even from trainable adapters
    assert not P.ggpo_row_std(P.row_sq_norms(w0), a.requires_grad_(), b.requires_grad_(), ga, gb, s).requires_grad


# --- the perturbed layer -------------------------------------------------------------------------


def _layer(dtype=D, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g, dtype=dtype)
    b = torch.randn(OUT, generator=g, dtype=dtype) if bias else None
    std = torch.rand(OUT, generator=g, dtype=torch.float32) + 0.1
    return w, b, std


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_forward_and_backward_match_an_independent_draw(bias, dtype):
    w, b, std = _layer(dtype, bias)
    seed = 1234
    w_ref = w + std[:, None].to(dtype) * _z(seed).to(dtype)
    x = torch.randn(2, 3, IN, dtype=dtype, requires_grad=True)
    y = P.perturbed_linear(x, w, b, std, seed)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_ref, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(y, y_ref, **tol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_gradcheck():
    w, b, std = torch.randn(7, 5, dtype=D), torch.randn(7, dtype=D), torch.rand(7) + 0.1
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    assert gradcheck(lambda x: P.perturbed_linear(x, w, b, std, 7), (x,))


def test_zero_std_is_the_plain_layer_exactly():
    w, b, _ = _layer(torch.float32)
    x = torch.randn(5, IN)
    assert torch.equal(P.perturbed_linear(x, w, b, torch.zeros(OUT), 3), F.linear(x, w, b))


def test_same_seed_same_output_different_seed_differs():
    w, b, std = _layer(torch.float32)
    x = torch.randn(4, IN)
    y1, y2 = P.perturbed_linear(x, w, b, std, 5), P.perturbed_linear(x, w, b, std, 5)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, P.perturbed_linear(x, w, b, std, 6))


def test_noise_has_the_requested_row_std():
    n = 4096
    w = torch.randn(8, n) * 0.02
    std = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0])
    eps = P.perturbed_linear(torch.eye(n), w, None, std, 11).t() - w  # x = identity rows: y = (W0 + ε)ᵀ
    assert eps.mean(1).abs().lt(4 * std / n**0.5).all()
    torch.testing.assert_close(eps.std(1), std, rtol=0.06, atol=0)
    # independent entries: rows are not copies of one another
    assert (torch.corrcoef(eps).fill_diagonal_(0).abs() < 0.1).all()


def test_saves_only_the_weight_and_row_std():
    w, b, std = _layer(torch.float32)
    x = torch.randn(6, 5, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = P.perturbed_linear(x, w, b, std, 2)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs == {w.untyped_storage().data_ptr(), std.untyped_storage().data_ptr()}
    assert all(t.numel() in (OUT * IN, OUT) for t in saved)  # the parameter itself, and out floats
    y.sum().backward()
    assert x.grad is not None


def test_weight_untouched_and_global_rng_untouched():
    w, b, std = _layer(torch.bfloat16)
    w_before, b_before = w.clone(), b.clone()
    x = torch.randn(3, IN, requires_grad=True)
    rng_before = torch.get_rng_state()
    P.perturbed_linear(x, w, b, std, 9).float().sum().backward()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(w.view(torch.int16), w_before.view(torch.int16))  # bitwise
    assert torch.equal(b.view(torch.int16), b_before.view(torch.int16))


def test_low_precision_weight():
    # bf16 W0, fp32 x: the GEMM runs in bf16 on W0 + ε rounded once; y in bf16, dx in fp32
    w, b, std = _layer(torch.bfloat16)
    std = std * 0.05
    x = torch.randn(2, 3, IN, requires_grad=True)
    y = P.perturbed_linear(x, w, b, std, 4)
    w_ref = (w.float() + std[:, None] * _z(4)).bfloat16()
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.detach().bfloat16(), w_ref, b))
    dy = torch.randn_like(y)
    y.backward(dy)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (dy @ w_ref).float())


def test_frozen_weight_and_bias_are_required():
    w, b, std = _layer(torch.float32)
    x = torch.randn(2, IN)
    with pytest.raises(ValueError, match="frozen"):
        P.perturbed_linear(x, w.requires_grad_(True), b, std, 0)
    with pytest.raises(ValueError, match="frozen"):
        P.perturbed_linear(x, w.detach(), b.requires_grad_(True), std, 0)
    with pytest.raises(ValueError, match="row_std"):
        P.perturbed_linear(x, w.detach(), None, std[:-1], 0)


def test_row_std_gets_no_gradient():
    w, b, _ = _layer(torch.float32)
    std = torch.full((OUT,), 0.1, requires_grad=True)
    x = torch.randn(2, IN, requires_grad=True)
    P.perturbed_linear(x, w, b, std, 0).sum().backward()
    assert std.grad is None and x.grad is not None


def test_conv1d_weight_as_a_transposed_view():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(OUT, IN).requires_grad_(False)  # weight stored (in × out)
    torch.nn.init.normal_(conv.bias)
    std = torch.full((OUT,), 0.2)
    x = torch.randn(2, 3, IN, requires_grad=True)
    y = P.perturbed_linear(x, conv.weight.t(), conv.bias, std, 8)
    w_ref = conv.weight.t() + std[:, None] * _z(8)
    torch.testing.assert_close(y, F.linear(x, w_ref, conv.bias))
    torch.testing.assert_close(P.perturbed_linear(x, conv.weight.t(), conv.bias, std * 0, 8), conv(x))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 3, OUT) @ w_ref)


def test_gradient_checkpointing_recomputes_the_same_noise():
    w1, b1, std1 = _layer(torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    w2, std2 = torch.randn(IN, OUT, generator=g), torch.rand(IN, generator=g)
    lora = torch.randn(IN, IN, requires_grad=True)  # a trainable tensor upstream of both layers
    x = torch.randn(4, IN)

    def block(h):
        h = torch.tanh(P.perturbed_linear(h @ lora, w1, b1, std1, 101))
        return P.perturbed_linear(h, w2, None, std2, 102)

    grads = []
    for use_checkpoint in (False, True):
        lora.grad = None
        y = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        (y**2).sum().backward()
        grads.append(lora.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_low_precision_input():
    # bf16 x, fp32 W0: the GEMM runs in W0's dtype, dx comes back in x's dtype
    w, b, std = _layer(torch.float32)
    x = torch.randn(3, IN, dtype=torch.bfloat16, requires_grad=True)
    y = P.perturbed_linear(x, w, b, std, 4)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.detach().float(), w + std[:, None] * _z(4), b))
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


# --- the LoRA update folded into the perturbed weight ---------------------------------------------


def _fold_inputs(dtype=D, bias=True):
    w, b, std = _layer(dtype, bias)
    a, bb, _, _ = _lora(dtype, seed=3)
    return w, b, std, a.requires_grad_(True), bb.requires_grad_(True)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_lora_matches_dense_math(bias):
    # y = x (W0 + ε)ᵀ + b + s·x Aᵀ Bᵀ, as LoRA computes it beside an independently drawn noisy layer
    w, b, std, a, bb = _fold_inputs(D, bias)
    s, seed = 0.75, 41
    x = torch.randn(2, 3, IN, dtype=D, requires_grad=True)
    y = P.perturbed_linear(x, w, b, std, seed, a, bb, s)
    refs = [t.detach().clone().requires_grad_(True) for t in (x, a, bb)]
    x_r, a_r, b_r = refs
    y_ref = F.linear(x_r, w + std[:, None].to(D) * _z(seed).to(D), b) + s * (x_r @ a_r.t()) @ b_r.t()
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for got, ref in zip((x, a, bb), refs):
        torch.testing.assert_close(got.grad, ref.grad)


def test_folded_lora_gradcheck():
    w, b, std, a, bb = _fold_inputs(D)
    x = torch.randn(2, 3, IN, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, a, bb: P.perturbed_linear(x, w, b, std, 7, a, bb, 1.5), (x, a, bb))


def test_folded_lora_saves_x_and_references_only():
    # LoRA's activation (x) and references to the parameters; no out × in scratch tensor
    w, b, std, a, bb = _fold_inputs(torch.float32)
    x = torch.randn(6, 5, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        P.perturbed_linear(x, w, b, std, 2, a, bb, 2.0)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs == {t.untyped_storage().data_ptr() for t in (x, w, std, a, bb)}
    # frozen adapter: nothing of x is kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        P.perturbed_linear(x, w, b, std, 2, a.detach(), bb.detach(), 2.0)
    assert x.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in saved}


def test_folded_lora_low_precision_weight_rounds_the_sum_once():
    w, b, std = _layer(torch.bfloat16)
    a, bb, _, _ = _lora(torch.bfloat16, seed=3)
    std = std * 0.05
    x = torch.randn(3, IN)
    y = P.perturbed_linear(x, w, b, std, 4, a, bb, 0.5)
    w_ref = (w.float() + std[:, None] * _z(4) + 0.5 * bb.float() @ a.float()).bfloat16()
    assert torch.equal(y, F.linear(x.bfloat16(), w_ref, b))


def test_folded_lora_gradient_checkpointing_is_bitwise_equal():
    w, b, std, a, bb = _fold_inputs(torch.float32)
    x = torch.randn(4, IN, requires_grad=True)

    def block(h):
        return torch.tanh(P.perturbed_linear(h, w, b, std, 101, a, bb, 2.0))

    grads = []
    for use_checkpoint in (False, True):
        for t in (x, a, bb):
            t.grad = None
        y = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        (y**2).sum().backward()
        grads.append([t.grad.clone() for t in (x, a, bb)])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_folded_lora_shapes_are_checked():
    w, b, std, a, bb = _fold_inputs(torch.float32)
    x = torch.randn(2, IN)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        P.perturbed_linear(x, w, b, std, 0, a, None)
    with pytest.raises(ValueError, match="do not fit"):
        P.perturbed_linear(x, w, b, std, 0, a, bb.t())


def test_a_non_finite_gradient_drops_the_beta_term_of_its_rows_only():
    # fp16 training: an overflowing step has inf gradients (the scaler skips it); the noise must stay finite
    a, b, ga, gb = _lora()
    w0_sq = torch.rand(OUT, dtype=D)
    gb = gb.clone()
    gb[3] = float("inf")
    std = P.ggpo_row_std(w0_sq, a, b, ga, gb, 0.5)
    assert torch.isfinite(std).all()
    no_grad = P.ggpo_row_std(w0_sq, a, b, None, None, 0.5)
    with_grad = P.ggpo_row_std(w0_sq, a, b, ga, torch.where(torch.isfinite(gb), gb, 0), 0.5)
    assert std[3] == no_grad[3]
    keep = torch.arange(OUT) != 3
    torch.testing.assert_close(std[keep], with_grad[keep])


def test_noise_is_drawn_one_block_of_rows_at_a_time(monkeypatch):
    # blocks of 5 rows: each from its own seed, the first from the seed itself; no out × in tensor formed
    from sparse_peft import ops

    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 5 * IN)
    w, std = torch.randn(OUT, IN), torch.rand(OUT)
    a, b, _, _ = _lora(torch.float32)
    whole = P.perturbed_weight(w, std, 7, a, b, 0.5)
    assert torch.equal(whole[:5], w[:5] + std[:5, None] * _z(7, (5, IN)) + 0.5 * b[:5] @ a)
    noise = whole - w - 0.5 * b @ a
    assert not torch.allclose(noise[5:10], noise[:5])  # distinct seeds per block
    x = torch.randn(3, IN, dtype=D, requires_grad=True)
    with LargestCreated() as seen:
        y = P.perturbed_linear(x.float(), w, None, std, 7, a.requires_grad_(), b.requires_grad_(), 0.5)
        dx, da = torch.autograd.grad(y.pow(2).sum(), (x, a))
    assert seen.largest[torch.float32] < OUT * IN
    ref = x.float() @ whole.t()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(dx.float(), 2 * ref @ whole, rtol=1e-5, atol=1e-4)
