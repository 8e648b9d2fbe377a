"""The autograd functions behind every sparse_peft layer.

Each function computes only the *update* term of a linear layer

    y = x Wᵀ + x Δᵀ + b

for one shape of Δ. The frozen term x Wᵀ + b is left to the base layer (plain or quantized): its
weight needs no gradient, so autograd keeps nothing of x for it. What each function keeps for
backward is what the gradient of its own trainable tensors needs, and nothing else.

Conventions shared by every function here:
- x has shape (..., in). The update has shape (..., out) and the dtype of the trainable tensors;
  the caller casts it to the dtype of the base output.
- x is saved in its own dtype. Casting a bf16 x to an fp32 adapter before saving it (as a plain
  `nn.Linear` adapter does) would keep a second copy at twice the bytes.
- dx comes back in x's dtype, and is only computed when x needs a gradient; the same holds for
  every trainable tensor (`ctx.needs_input_grad`).
- Index tensors are the stored int32 (or int64) buffers themselves, sorted and unique, never
  differentiated. Saving them costs nothing; an int64 copy per call would cost more than the
  rank-r activation a LoRA keeps.

This module knows nothing of PEFT, configs or methods: tensors in, tensors out.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


# Upper bound, in elements, of the (tokens × chunk) temporaries of the sampled gradient below.
_SDDMM_CHUNK_ELEMENTS = 1 << 23


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _sparse(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size, coalesced: bool) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, size, is_coalesced=coalesced, check_invariants=False
    )


def sampled_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dtype) -> torch.Tensor:
    """(dyᵀ x)[rows[j], cols[j]] for every j, without ever forming the dense out×in product (an SDDMM).

    dy: (N, out), x: (N, in). Works in chunks of the support so that the temporaries stay bounded.
    """
    n = max(dy.shape[0], 1)
    chunk = max(1, _SDDMM_CHUNK_ELEMENTS // n)
    out = torch.empty(rows.numel(), dtype=dtype, device=dy.device)
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        out[start : start + chunk] = (dy.index_select(1, r).to(dtype) * x.index_select(1, c).to(dtype)).sum(0)
    return out


def split_flat(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major flat indices into (out × in) -> int64 (rows, cols)."""
    flat = indices.long()
    return flat // in_features, flat % in_features


class SparseLinear(Function):
    """Update of an unstructured sparse Δ: Δ.flatten()[indices[j]] = values[j], zero elsewhere.

    Forward is a sparse-dense product; nothing of size out×in is built, in forward or backward.
    Saves x (the gradient at the support, dv_j = Σ_n dy[n, row_j] · x[n, col_j], needs the
    columns it touches, which at any useful density is all of them), values (a reference to the
    parameter, for dx) and the flat indices, which must be sorted and unique.
    """

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int):
        in_features = x.shape[-1]
        rows, cols = split_flat(indices, in_features)
        delta = _sparse(rows, cols, values, (out_features, in_features), coalesced=True)
        y = torch.sparse.mm(delta, _rows2d(x).to(values.dtype).t()).t()
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, indices)
        ctx.x_meta = (x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, values, indices = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        rows, cols = split_flat(indices, x_shape[-1])
        dy2 = _rows2d(dy).to(values.dtype)
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            # Δᵀ as a sparse matrix: the transposed pattern is no longer row-major, so let torch sort it.
            delta_t = _sparse(cols, rows, values, (x_shape[-1], dy2.shape[1]), coalesced=False)
            dx = torch.sparse.mm(delta_t, dy2.t()).t().reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dvalues = sampled_grad(dy2, _rows2d(x), rows, cols, values.dtype)
        return dx, dvalues, None, None


class RowLinear(Function):
    """Update of trainable output rows: Δ[rows, :] = block (s × in), zero elsewhere.

    Saves x: the block's gradient dy[:, rows]ᵀ x needs every input column, so rows save
    gradient and optimizer memory but no activation memory.
    """

    @staticmethod
    def forward(ctx, x, block, rows, out_features: int):
        x2 = _rows2d(x)
        y = x2.new_zeros((x2.shape[0], out_features), dtype=block.dtype)
        y.index_add_(1, rows, x2.to(block.dtype) @ block.t())  # rows are unique: a copy
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, block, rows)
        ctx.x_meta = (x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, block, rows = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy_rows = _rows2d(dy).index_select(1, rows).to(block.dtype)
        dx = dblock = None
        if ctx.needs_input_grad[0]:
            dx = (dy_rows @ block).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dblock = dy_rows.t() @ _rows2d(x).to(block.dtype)
        return dx, dblock, None, None


class ColumnLinear(Function):
    """Update of trainable input columns: Δ[:, cols] = block (out × s), zero elsewhere.

    Saves only x[..., cols], as a fresh copy made by index_select. A slice view would be smaller
    on paper but would pin the storage of the whole of x. This is the activation saving of S²FT:
    a layer that trains s of its in columns keeps s/in of its input.
    """

    @staticmethod
    def forward(ctx, x, block, cols):
        x_sel = _rows2d(x).index_select(1, cols)
        y = x_sel.to(block.dtype) @ block.t()
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[1] else None, block, cols)
        ctx.x_meta = (x.shape, x.dtype)
        return y.reshape(*x.shape[:-1], block.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_sel, block, cols = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = _rows2d(dy).to(block.dtype)
        dx = dblock = None
        if ctx.needs_input_grad[0]:
            dx2 = dy2.new_zeros((dy2.shape[0], x_shape[-1]), dtype=x_dtype)
            dx = dx2.index_add_(1, cols, (dy2 @ block).to(x_dtype)).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dblock = dy2.t() @ x_sel.to(block.dtype)
        return dx, dblock, None


class LowRankLinear(Function):
    """Update of a low-rank Δ = scaling · B A, with A (r × in) and B (out × r).

    Saves x only. The rank-r activation h = x Aᵀ that B's gradient needs is recomputed in
    backward (one N·in·r product) instead of being kept, as two chained linear layers would.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float):
        h = _rows2d(x).to(lora_a.dtype) @ lora_a.t()
        y = (h @ lora_b.t()) * scaling
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(x if keep_x else None, lora_a, lora_b)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.scaling = scaling
        return y.reshape(*x.shape[:-1], lora_b.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, lora_a, lora_b = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = _rows2d(dy).to(lora_b.dtype)
        g = (dy2 @ lora_b) * ctx.scaling  # gradient at h, (N × r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = (g @ lora_a).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = _rows2d(x).to(lora_a.dtype)
            if ctx.needs_input_grad[1]:
                da = g.t() @ x2
            if ctx.needs_input_grad[2]:
                db = (dy2.t() @ (x2 @ lora_a.t())) * ctx.scaling
        return dx, da, db, None


def sparse_linear(x, values, indices, out_features: int) -> torch.Tensor:
    return SparseLinear.apply(x, values, indices, out_features)


def row_linear(x, block, rows, out_features: int) -> torch.Tensor:
    return RowLinear.apply(x, block, rows, out_features)


def column_linear(x, block, cols) -> torch.Tensor:
    return ColumnLinear.apply(x, block, cols)


def low_rank_linear(x, lora_a, lora_b, scaling: float) -> torch.Tensor:
    return LowRankLinear.apply(x, lora_a, lora_b, scaling)
