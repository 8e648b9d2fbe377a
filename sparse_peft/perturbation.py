"""LoRA-GGPO: the perturbation's scale (per-row norms) and the perturbed frozen linear layer.

LoRA-GGPO (Chang et al., arXiv 2502.14538 v1) trains a LoRA while every training forward uses a
noisy merged weight W' + ε, W' = W0 + s·B·A, with ε drawn afresh per step, row by row (Eq. 6):

    ε_ij ~ N(0, (σ²/n) · (‖W'_i‖² + β·‖∇W'_i‖²)),   n = in_features, σ = 0.03, β = 0.01,

    ‖W'_i‖² ≈ ‖W0_i‖² + ‖(sBA)_i‖²                    (Eq. 7)
    ∇W'    ≈ s·(B·∇A + ∇B·A)                          (Eq. 8, gradients of the previous step).

No official code for v1 exists (the authors' repository now holds its successor, LoRA-MGPO):
this module is our reconstruction from the equations. Its choices:
- Eq. 7 is taken literally (no cross term 2·⟨W0_i, (sBA)_i⟩), and ‖W0_i‖² is exact, computed
  once per layer, not estimated from sampled rows.
- ε enters with its gradient path: dx = dy·(W0 + ε), the gradient of the perturbed network,
  not of the clean one.
- ε is never stored. It is regenerated from an integer seed in backward (as Flat-LoRA does), so
  a layer keeps no out×in tensor for backward, and W0 is never written to: removing the
  perturbation is exact by construction. Each pass draws it one block of rows at a time (1 MiB in
  fp32, each block from its own seed), so not even a transient out×in tensor is formed.
- The LoRA update s·B·A is folded into the same scratch weight W0 + ε + s·B·A, so each pass is one
  GEMM. The scratch weight has to be built for the noise anyway, and adding a rank-r product to it
  costs r multiply-adds per weight, while LoRA's own path costs two thin GEMMs and an add over
  every token per pass. On CPU this pays for most of the noise draw (the Gaussian draw is the
  expensive part there: ~7 ns per weight, twice per step). The only activation kept is x, for
  A's and B's gradients, as LoRA keeps it.

Everything here is tensors in, tensors out. The caller decides which seed each layer gets at
each forward (it must be fixed before the forward, so that a checkpointed recompute and the
backward see the same one: e.g. derived from the step, micro-batch and layer index) and when the
cached norms are refreshed (after clipping, before the optimizer step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function

from . import ops
from .prng import seed_for


# Bound, in elements, on the float32 block of W0 that row_sq_norms converts at a time (16 MiB).
_ROW_BLOCK_ELEMENTS = 1 << 22


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 if an input is float64: never accumulate a norm in bf16/fp16."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def row_sq_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W0_i‖² for each row of an (out × in) weight: Eq. 7's frozen part, computed once per layer.

    Streams blocks of rows, so a bf16/fp16 weight is converted at most one block at a time,
    never as a whole fp32 copy. Returns float32 (float64 for a float64 weight). A transposed view
    (a Conv1D weight's .t()) works too.
    """
    acc = _acc(weight)
    out_features, in_features = weight.shape
    result = torch.empty(out_features, dtype=acc, device=weight.device)
    step = max(1, _ROW_BLOCK_ELEMENTS // max(in_features, 1))
    with torch.no_grad():
        for r0 in range(0, out_features, step):
            block = weight[r0 : r0 + step].to(acc)
            result[r0 : r0 + step] = torch.linalg.vecdot(block, block)
    return result


def _quad(left: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise left_i · gram · right_iᵀ for (out × r) left/right and an (r × r) gram."""
    return torch.linalg.vecdot(left @ gram, right)


def low_rank_row_sq_norms(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖(s·B·A)_i‖² = s²·b_i (A Aᵀ) b_iᵀ: Eq. 7's adapter part.

    Goes through the r × r Gram matrix A·Aᵀ, never forming B·A: O((out + in)·r²) work, no
    out × in tensor. A: (r × in), B: (out × r). Returns float32 (float64 for float64 inputs).
    """
    acc = _acc(lora_A, lora_B)
    with torch.no_grad():
        a, b = lora_A.to(acc), lora_B.to(acc)
        return _quad(b, a @ a.t(), b) * scaling**2


def low_rank_grad_row_sq_norms(lora_A, lora_B, grad_A, grad_B, scaling: float) -> torch.Tensor:
    """‖s·(B·gA + gB·A)_i‖², the row norms of Eq. 8's estimate of ∇W', exactly.

    Row i of the sum is b_i·gA + gb_i·A, whose squared norm expands into three quadratic forms
    with the r × r Gram matrices gA·gAᵀ, gA·Aᵀ and A·Aᵀ:

        b_i (gA gAᵀ) b_iᵀ + 2·b_i (gA Aᵀ) gb_iᵀ + gb_i (A Aᵀ) gb_iᵀ

    so nothing of size out × in is formed. Either gradient may be None (taken as zero). The
    expansion can round to a tiny negative value; it is clamped at zero.
    """
    acc = _acc(lora_A, lora_B)
    with torch.no_grad():
        a, b = lora_A.to(acc), lora_B.to(acc)
        total = torch.zeros(b.shape[0], dtype=acc, device=b.device)
        ga = None if grad_A is None else grad_A.to(acc)
        gb = None if grad_B is None else grad_B.to(acc)
        if ga is not None:
            total += _quad(b, ga @ ga.t(), b)
        if gb is not None:
            total += _quad(gb, a @ a.t(), gb)
        if ga is not None and gb is not None:
            total += 2 * _quad(b, ga @ a.t(), gb)
        return total.clamp_(min=0) * scaling**2


def ggpo_row_std(
    w0_row_sq: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    grad_A: torch.Tensor | None,
    grad_B: torch.Tensor | None,
    scaling: float,
    sigma: float = 0.03,
    beta: float = 0.01,
) -> torch.Tensor:
    """Per-row standard deviation of ε (Eq. 6 with Eq. 7 and 8), shape (out,):

        sqrt((σ²/n) · (‖W0_i‖² + ‖(sBA)_i‖² + β·‖s(B·gA + gB·A)_i‖²)),   n = in_features.

    w0_row_sq is row_sq_norms(W0), cached. grad_A / grad_B are the previous step's gradients;
    with both None (the first step) the β term is zero. A row whose gradient term is not finite
    (an fp16 overflow: the loss scaler skips that step) gets no β term rather than infinite noise,
    which would poison every later forward. Returns float32 (float64 for float64 inputs); carries
    no autograd history.
    """
    n = lora_A.shape[-1]
    with torch.no_grad():
        var = w0_row_sq.to(_acc(w0_row_sq, lora_A)) + low_rank_row_sq_norms(lora_A, lora_B, scaling)
        if beta and (grad_A is not None or grad_B is not None):
            g = low_rank_grad_row_sq_norms(lora_A, lora_B, grad_A, grad_B, scaling)
            var = var + beta * torch.where(torch.isfinite(g), g, 0.0)  # no host sync
        return (var * (sigma**2 / n)).sqrt_()


def _block_seed(seed: int, block: int) -> int:
    """The seed of the noise on one block of rows: `seed` itself for the first (a layer of one block draws
    exactly Z(seed)), prng.seed_for(seed, "block <b>") for the others."""
    return seed if block == 0 else seed_for(seed, f"block {block}")


def perturbed_blocks(
    weight: torch.Tensor,
    row_std: torch.Tensor,
    seed: int,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
):
    """(r0, r1, W0[r0:r1] + row_std[r0:r1, None] · Z_b (+ scaling · B[r0:r1] · A)) for each block b of rows,
    fresh tensors in W0's dtype of ≤ ops._BLOCK_ELEMENTS entries (1 MiB in fp32), made as the caller takes them:
    no out × in tensor is formed for a layer larger than one block.

    Z_b ~ N(0, 1) is drawn in float32 from a private torch.Generator on W0's device seeded with
    `_block_seed(seed, b)`, so the global RNG is untouched and the same seed gives the same blocks bit for
    bit, in forward and again in backward. (float32 because it is the fastest exact draw: bf16 and float64
    draws are slower on CPU, and one dtype keeps Z the same whatever W0's dtype.) The sum is formed in
    float32 (float64 for a float64 W0) and rounded to W0's dtype once: for a bf16 W0 this rounds W0 + ε
    instead of adding an already rounded ε to W0.
    """
    acc = _acc(weight)
    out_features, in_features = weight.shape
    step = max(1, ops._BLOCK_ELEMENTS // max(in_features, 1))
    gen = torch.Generator(device=weight.device)
    std = row_std.detach().to(acc)
    for b, r0 in enumerate(range(0, out_features, step)):
        r1 = min(r0 + step, out_features)
        gen.manual_seed(_block_seed(seed, b))
        noise = torch.randn((r1 - r0, in_features), generator=gen, dtype=torch.float32, device=weight.device).to(acc)
        noise.mul_(std[r0:r1, None]).add_(weight[r0:r1].detach())
        if lora_A is not None:
            noise.addmm_(lora_B[r0:r1].detach().to(acc), lora_A.detach().to(acc), alpha=scaling)
        yield r0, r1, noise.to(weight.dtype)


def perturbed_weight(weight, row_std, seed: int, lora_A=None, lora_B=None, scaling: float = 1.0) -> torch.Tensor:
    """The whole W0 + ε (+ scaling · B · A) that `PerturbedLinear` applies block by block, as one fresh tensor
    (for inspection and tests: the layer itself never forms it)."""
    return torch.cat([block for _, _, block in perturbed_blocks(weight, row_std, seed, lora_A, lora_B, scaling)])


class PerturbedLinear(Function):
    """y = x·(W0 + ε + s·B·A)ᵀ + b for a frozen W0 (out × in), ε = row_std[:, None] · Z(seed), and an
    optional LoRA pair A (r × in), B (out × r) with scaling s.

    Saves W0 (a reference to the frozen parameter), row_std (out floats), A and B (references),
    and x only if A or B needs a gradient (W0 gets none, so the noise alone needs no activation).
    The seed is an int on ctx. Not ε or the scratch weight: each pass rebuilds it from the seed one
    block of rows at a time (perturbed_blocks, same generator and dtype path), so no out × in tensor is
    formed; backward returns dx = dy·(W0 + ε + s·B·A), summed over the blocks. A's and B's gradients
    are LoRA's, from rank-r products: s·(dy·B)ᵀ·x and s·dyᵀ·(x·Aᵀ).

    x: (..., in), any float dtype; the GEMM runs in W0's dtype (x and b cast to it), y comes out
    in W0's dtype, dx in x's dtype, A's and B's gradients in theirs. W0, b and row_std get no gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, row_std, seed: int, lora_A=None, lora_B=None, scaling: float = 1.0):
        bias = None if bias is None else bias.to(weight.dtype)
        blocks = perturbed_blocks(weight, row_std, seed, lora_A, lora_B, scaling)
        y = ops.linear_by_blocks(x.to(weight.dtype), blocks, weight.shape[0], bias)
        ctx.train_lora = lora_A is not None and (ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
        ctx.save_for_backward(weight, row_std, lora_A, lora_B, x if ctx.train_lora else None)
        ctx.seed, ctx.scaling = seed, scaling
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, row_std, lora_A, lora_B, x = ctx.saved_tensors
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            blocks = perturbed_blocks(weight, row_std, ctx.seed, lora_A, lora_B, ctx.scaling)
            dx = ops.input_grad_by_blocks(dy.reshape(-1, dy.shape[-1]).to(weight.dtype), blocks, weight.shape[1])
            dx = dx.reshape(*dy.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.train_lora:
            dy2 = dy.reshape(-1, dy.shape[-1]).to(lora_B.dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(lora_A.dtype)
            if ctx.needs_input_grad[5]:
                da = ((dy2 @ lora_B).t() @ x2).mul_(ctx.scaling)
            if ctx.needs_input_grad[6]:
                db = (dy2.t() @ (x2 @ lora_A.t())).mul_(ctx.scaling)
        return dx, None, None, None, None, da, db, None


# The noise comes from a torch.Generator made and seeded inside the op, which dynamo cannot trace
# (an opaque object created mid-graph): under torch.compile this op runs eagerly, a graph break per
# layer in GGPO's training forwards (eval forwards have no noise and trace whole).
@torch.compiler.disable
def perturbed_linear(x, weight, bias, row_std, seed: int, lora_A=None, lora_B=None, scaling: float = 1.0) -> torch.Tensor:
    """x·(W0 + ε + s·B·A)ᵀ + b with ε_ij = row_std_i · Z_ij, Z regenerated from `seed` (see PerturbedLinear).

    weight is (out × in). For transformers' Conv1D, whose weight is stored (in × out), pass the
    view `conv.weight.t()`: nothing is copied, and the noise is indexed like a Linear's.
    row_std is used as a constant (detached): it must not change in place before backward.
    lora_A (r × in) and lora_B (out × r), trainable, are optional; pass both or neither.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(
            "perturbed_linear: the base weight and bias must be frozen (requires_grad=False); "
            "LoRA-GGPO perturbs W0 and trains only the adapter"
        )
    if row_std.shape != weight.shape[:1]:
        raise ValueError(f"perturbed_linear: row_std has shape {tuple(row_std.shape)}, expected ({weight.shape[0]},)")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("perturbed_linear: pass both lora_A and lora_B, or neither")
    if lora_A is not None and (lora_A.shape[1] != weight.shape[1] or lora_B.shape != (weight.shape[0], lora_A.shape[0])):
        raise ValueError(
            f"perturbed_linear: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} do not fit a "
            f"weight of shape {tuple(weight.shape)} (expected (r, {weight.shape[1]}) and ({weight.shape[0]}, r))"
        )
    return PerturbedLinear.apply(x, weight, bias, row_std.detach(), int(seed), lora_A, lora_B, float(scaling))
