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

What each path *forms* (transients, built and dropped inside one forward or backward; none is kept
for backward, and no frozen weight ever gets a `.grad`). N tokens, a layer of out × in, k support entries,
B = _BLOCK_ELEMENTS = 2¹⁸ entries (1 MiB in fp32); a "block" is the rows r0:r1 of an out × in matrix,
max(1, B // in) rows. No path forms an out × in tensor for a layer of more than B entries: every dense
scratch is ≤ B entries, at most two alive at once (under torch.compile a layer is one block, unbounded).

- CSR (wherever torch multiplies CSR matrices of the values' dtype: CPU fp32 / fp64, probed once;
  `csr_times`): the forward x Δᵀ and, in backward, dx = dy Δ over Δᵀ's pattern, each as a fresh N × out
  (N × in) product, made in chunks of ≤ max(16, N // 8) and ≤ B // (out + in) tokens (torch copies its
  operand and result whole otherwise). The weight gradient at the support is torch's SDDMM (`csr_grad`),
  over the same chunks. One token at inference is a matrix-vector product added into the base
  layer's output (`decode_add`). The patterns (int32 row pointers and columns, 4 bytes per entry;
  Δᵀ's with the entries' order, 8 bytes per entry) are kept per support by the layer (`Layout`), made
  at creation or a support change, not per call. Inference takes this path except for long prompts,
  training below SCRATCH_TRAIN_ABOVE_DENSITY (`scratch_pays`); without a Layout (torch.compile) or for
  other dtypes (bf16 on CPU) the mode's own paths below run.
- gather (`product_mode` "gather": N·k ≤ out·in/16, e.g. decoding without CSR): x's columns at the
  support and their products, N × k, and int64 row/column indices (16 bytes per entry, kept by the
  Layout once a path needs them). Its gradient is the sampled one below.
- sparse kernels ("sparse": density < SPARSE_KERNEL_BELOW_DENSITY): a COO Δ (int64 row/column
  indices, sorted again for Δᵀ) and the sampled gradient: three N × c temporaries (gathered dy,
  gathered x, their product) with c = min(k, B // N), i.e. ≤ 3·B entries.
- row blocks ("dense": density ≥ SPARSE_KERNEL_BELOW_DENSITY): dense blocks of Δ (forward, dx) and
  of dW = dyᵀx (the gradient, read at the support), ≤ B entries each, two at once at the turn from
  one block to the next, plus int64 block-local indices.
- fused one GEMM per block (`MergedSparseLinear`, taken where `scratch_pays`: a long prompt at
  inference, or training without the CSR kernels): blocks of W + Δ (+ s·B·A) in W's dtype, forward
  and again in backward, and dW blocks for the gradient: ≤ B entries each.
- rows / columns / low-rank (`RowLinear`, `ColumnLinear`, `LowRankLinear`): products of N × s or
  N × r and the s × in, out × s or r × in gradients themselves.
Outside this module: Conv2d layers (layer.py) build a dense ΔW (out × in·kh·kw) each forward,
which conv2d keeps for backward, and get a dense dW from conv2d's backward; LoRA-GGPO
(perturbation.py) draws its noise and scratch weight in blocks of ≤ B entries; SpIEL's gradient
probe forms dW in row blocks (a block and its |·|, ≤ 3·B entries at once) in the first backward of
each window; RoSA's warm-up streams dW in blocks into its pool; SaRA's nuclear-norm penalty forms a
dense fp32 ΔW and its SVD, for `nuclear_norm_layers` layers (default 1) a step.
Measured, per path and per method: docs/memory.md, `python benchmarks/peak.py`.

This module knows nothing of PEFT, configs or methods: tensors in, tensors out.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.autograd import Function


# Bound, in elements (1 MiB in fp32), on every dense scratch a path forms: each block of rows of Δ, of dW or
# of the fused path's W + Δ, and each (tokens × chunk) product of the sampled gradients; up to two live at
# once. 1 MiB keeps such scratch below the activations of even a short sequence (issue #17: a training step's
# true peak within 2% of LoRA's at 1 × 128 tokens); blocks of 256 rows at 1024 wide still run GEMMs of useful
# size (the fused path's steps in `python benchmarks/train_paths.py` are measured with them).
_BLOCK_ELEMENTS = 1 << 18
# Below this fraction of non-zeros, sparse kernels beat dense GEMMs on row blocks; above it the
# GEMMs win although they do more FLOPs. `python benchmarks/layer_timings.py` (docs/kernels.md, CPU, one
# thread, torch 2.13) times both over densities on 1024² to 4096² layers: forward + backward break
# even at 0.24-0.40 % (two runs); at 1 % the row blocks are 2.2-3.4x faster, at 4 % 7-12x; at 0.1 %
# the sparse kernels are 2.2-4.3x faster. Unmeasured on GPUs, where the crossover may lie elsewhere.
SPARSE_KERNEL_BELOW_DENSITY = 0.003
# With few tokens (decoding, small eval batches) each support entry is touched a few times: a gather
# of x's columns and a scatter-add into y's rows, O(tokens · k), beats anything that forms out×in
# (a dense block, a scratch W + Δ) while tokens · k ≤ GATHER_BELOW · out · in. CPU, torch 2.13, one
# token: 2.6x faster on a 2048² layer at 1%, 0.8x on a 688 × 256 one at 4% (benchmarks/layer_timings.py).
GATHER_BELOW = 1 / 16


def product_mode(n_tokens: int, k: int, out_features: int, in_features: int) -> str:
    """How to multiply by an unstructured Δ of k entries: "gather", "sparse" (kernels) or "dense" (row blocks)."""
    size = out_features * in_features
    if n_tokens * k <= GATHER_BELOW * size:
        return "gather"
    return "sparse" if k < SPARSE_KERNEL_BELOW_DENSITY * size else "dense"


# At inference, the fused path's copy of W + Δ (one pass over out·in entries) beats the CSR product (a pass over
# tokens · k entries) once tokens · k ≥ SCRATCH_ABOVE · out · in. `python benchmarks/csr_timings.py` (its prompt
# table; CPU, 1 thread, LoRA r=8's count), fused / (base GEMM + CSR) at tokens · k / (out · in) = 2, 8, 32 on
# 1024²: 1.05, 0.91, 0.68; at 1.4, 5.5, 22 on 2752 × 1024: 1.12, 1.00, 0.70.
SCRATCH_ABOVE = 5.0
# In training, the CSR path's three sparse products (~1 ns per token·entry together) against the fused path's
# dense dW (~0.025 ns per token·weight entry): the fused path is faster above ~2.5% density. Training steps per
# LoRA's, CSR against fused (`python benchmarks/train_paths.py`: CPU, 1 thread, 4 × 256 tokens, LoRA r=8's
# count): hidden 1024 (1.1%) SpIEL 1.24 vs 1.38, DSEE 1.22 vs 1.40; hidden 256 (4.3%) SpIEL 1.52 vs 1.11,
# DSEE 1.41 vs 1.01.
SCRATCH_TRAIN_ABOVE_DENSITY = 0.02


def scratch_pays(n_tokens: int, values: torch.Tensor, layout: "Layout | None", out_features: int, in_features: int,
                 training: bool) -> bool:
    """Whether a layer should take the fused one-GEMM path (a scratch W + Δ, in blocks of rows) for a call of
    `n_tokens` tokens, rather than the base layer's GEMM plus the update's own product.

    Training: where the CSR kernels and the sampled gradient run, only above SCRATCH_TRAIN_ABOVE_DENSITY (below
    it they are faster, and form nothing of out × in: 1,024 tokens of 2752 × 1024 at 1.1%, the gradient at the
    support 7.7 against 18.2 ms for the dense dW, 2 threads, benchmarks/csr_timings.py); elsewhere (bf16 on CPU) unless the call is gather-sized.
    Inference (or a forward in eval mode): with CSR, when the copy is cheaper than the product. Either way its
    scratch is ≤ one block. The caller's `training` is the module's mode with autograd on, not whether the
    values require grad: a model and its reloaded, frozen copy then take the same path, bit for bit."""
    k = values.numel()
    if product_mode(n_tokens, k, out_features, in_features) == "gather":
        return False  # few tokens (decoding): the update's own product beats any scratch W
    if layout is None or not csr_works(values.device, values.dtype):
        return True
    if training:
        return not trains_by_csr(k, out_features, in_features, values.device, values.dtype)
    return n_tokens * k >= SCRATCH_ABOVE * out_features * in_features


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def split_flat(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major flat indices into (out × in) -> int64 (rows, cols)."""
    flat = indices.long()
    return flat // in_features, flat % in_features


class Layout:
    """The index forms of one sorted, unique flat support of an out × in matrix, derived once per support.

    Supports are stored as flat row-major int32 indices (what adapter files hold). The gather and the
    sparse kernels need rows and columns: recomputed every call (a floor-divide and a remainder over all
    k entries) they were a fifth of a decoding step. A layer keeps one Layout per support and asks it
    for them; they are made the first time they are needed and kept until the support changes (the
    layer compares the index buffer's version: every in-place write, a regrowth, bumps it).
    Derived state, never saved or trained, each form made only by a path that uses it: the CSR pattern
    (4 bytes per entry) and Δᵀ's (8 bytes per entry) for the CSR paths; int64 rows and columns (16 bytes per
    entry: index_add_ and index_select with int32 indices are many times slower on CPU) for the gather and
    COO paths, where no CSR kernel runs.
    """

    __slots__ = ("indices", "version", "in_features", "_rows_cols", "_csr", "_csr_t", "_matrix")

    def __init__(self, indices: torch.Tensor, in_features: int):
        self.indices, self.version, self.in_features = indices, indices._version, in_features
        self._rows_cols = self._csr = self._csr_t = self._matrix = None

    def fits(self, indices: torch.Tensor, in_features: int) -> bool:
        return self.indices is indices and self.version == indices._version and self.in_features == in_features

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows_cols is None:
            self._rows_cols = split_flat(self.indices, self.in_features)
        return self._rows_cols

    def csr(self, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row pointers, column of each entry), int32: the support as a CSR pattern (the flat indices are sorted,
        so the entries are already in CSR order and the values need no permutation). 4 bytes per entry."""
        if self._csr is None:
            flat = self.indices.long()
            counts = torch.bincount(flat // self.in_features, minlength=out_features)
            crow = torch.zeros(out_features + 1, dtype=torch.int32, device=flat.device)
            crow[1:] = counts.cumsum(0)
            self._csr = (crow, (flat % self.in_features).to(torch.int32))
        return self._csr

    def csr_t(self, out_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δᵀ's CSR pattern: (column pointers, row of each entry) int32, and `order`, the entries sorted by column
        (values[order] are Δᵀ's values), int32. For the backward's dx; 8 bytes per entry. The int64 rows and
        columns it is made from are not kept (16 bytes per entry, four times the values' own)."""
        if self._csr_t is None:
            rows, cols = self._rows_cols if self._rows_cols is not None else split_flat(self.indices, self.in_features)
            order = torch.argsort(cols * out_features + rows)
            ptr = torch.zeros(self.in_features + 1, dtype=torch.int32, device=rows.device)
            ptr[1:] = torch.bincount(cols, minlength=self.in_features).cumsum(0)
            self._csr_t = (ptr, rows[order].to(torch.int32), order.to(torch.int32))
        return self._csr_t


_KERNEL_WORKS: dict = {}


def _kernel_works(kernel: str, device: torch.device, dtype: torch.dtype, check) -> bool:
    """Whether `check(device, dtype)` (a 1 × 1 product through one of torch's sparse kernels) runs and gives the
    right answer; asked once per (kernel, device type, dtype), the answer kept. Autocast off: asked first inside
    a bf16 autocast region, the probe would run in bf16, and the answer kept for fp32 would be no."""
    key = (kernel, device.type, dtype)
    if key not in _KERNEL_WORKS:
        import warnings

        try:
            with warnings.catch_warnings(), torch.autocast(device.type, enabled=False):
                warnings.simplefilter("ignore")  # torch's one-time "sparse CSR support is in beta" notice
                _KERNEL_WORKS[key] = bool(check(device, dtype))
        except (RuntimeError, NotImplementedError, TypeError):
            _KERNEL_WORKS[key] = False
        if not _KERNEL_WORKS[key]:
            # correct either way, but slower and with ≤ 1 MiB scratch blocks: say so once, at INFO (bf16 on a CPU,
            # an expected case, would make a warning noise)
            logging.getLogger("sparse_peft").info(
                "torch's sparse %s kernel does not run for %s on %s: the unstructured update takes the row-block or "
                "fused path there (exact; slower, with scratch blocks of at most 1 MiB)", kernel, dtype, device.type)
    return _KERNEL_WORKS[key]


def _one_by_one(device, dtype, value) -> torch.Tensor:
    return torch.sparse_csr_tensor(torch.tensor([0, 1], dtype=torch.int32, device=device),
                                   torch.zeros(1, dtype=torch.int32, device=device), value, (1, 1))


def _csr_check(device, dtype) -> bool:
    one = torch.ones(1, dtype=dtype, device=device)
    s = _one_by_one(device, dtype, one)
    return bool((torch.mv(s, one) == 1).all()) and bool(((s @ one[None].expand(1, 2)) == 1).all())


def _sddmm_check(device, dtype) -> bool:
    one = torch.ones(1, 1, dtype=dtype, device=device)
    return bool((torch.sparse.sampled_addmm(_one_by_one(device, dtype, one[0]), one * 2, one * 3, beta=0.0).values() == 6).all())


def csr_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies CSR matrices of `dtype` on this device (CPU: float32 and float64, through MKL;
    not bfloat16 or float16). Asked once per (device type, dtype) with a 1 × 1 product; the answer is kept."""
    return _kernel_works("csr", device, dtype, _csr_check)


def sddmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.sparse.sampled_addmm runs for CSR matrices of `dtype` on this device (CPU: float32 and
    float64; not bfloat16 or float16). Asked once per (device type, dtype) with a 1 × 1 product."""
    return _kernel_works("sddmm", device, dtype, _sddmm_check)


def trains_by_csr(k: int, out_features: int, in_features: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether training multiplies by a support of k entries through CSR products and torch's SDDMM (the kernels
    run for this device and dtype, and the support is below SCRATCH_TRAIN_ABOVE_DENSITY) rather than the fused
    path."""
    return (k < SCRATCH_TRAIN_ABOVE_DENSITY * out_features * in_features and csr_works(device, dtype)
            and sddmm_works(device, dtype))


def csr_times(a: torch.Tensor, values: torch.Tensor, layout: Layout, out_features: int) -> torch.Tensor:
    """a Δᵀ (a: N × in) with Δ as a CSR matrix over the layout's pattern and `values` (no copy of either).

    Forms nothing of out × in: the product itself (N × out) and, per chunk of tokens (`_csr_rows`), MKL's
    copies. Timed against the other paths by `python benchmarks/csr_timings.py`."""
    # The matrix wraps `values` (no copy), so in-place updates (an optimizer step) show through it. It is kept
    # while the same tensor with the same storage comes back: a frozen-slot or scaled copy, a `.data` swap, or
    # an engine freeing and re-gathering the storage (ZeRO-3) makes a new one.
    return _csr_rows(_csr_matrix(values, layout, out_features, a.shape[1]), a)


def _csr_matrix(values: torch.Tensor, layout: Layout, out_features: int, in_features: int) -> torch.Tensor:
    """Δ as a CSR matrix over the layout's pattern and `values` itself (no copy), kept by the layout (see csr_times)."""
    storage = values.untyped_storage()
    stamp = (storage.data_ptr(), storage.nbytes(), values.storage_offset())
    kept = layout._matrix
    if kept is not None and kept[0] is values and kept[1] == stamp:
        return kept[2]
    crow, col = layout.csr(out_features)
    delta = torch.sparse_csr_tensor(crow, col, values.detach(), (out_features, in_features), check_invariants=False)
    layout._matrix = (values, stamp, delta)
    return delta


def _csr_rows(matrix: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a Mᵀ for a CSR matrix M (rows × cols) and a dense a (N × cols), as a fresh N × rows tensor.

    torch multiplies CSR × dense column by column of the dense operand: (M aᵀ) is rows × N, and on the way it
    copies aᵀ and its own result whole. Chunks of tokens (`_token_chunk`) bound those copies; each chunk's
    product is written into the N × rows result. `python benchmarks/csr_timings.py` (its kernels table, 2
    threads, 1,024 tokens of 2752 × 1024): 1.73 MiB beyond the result in chunks, 14.76 MiB whole, at a cost in
    time (7.9 against 4.2 ms: the chunks parallelise worse). One token: a matrix-vector product."""
    with _exact(a):
        if a.shape[0] == 1:
            return torch.mv(matrix, a[0])[None]
        step = _token_chunk(a.shape[0], sum(matrix.shape))
        if a.shape[0] <= step:
            return (matrix @ a.t()).t()
        result = a.new_empty(a.shape[0], matrix.shape[0], dtype=matrix.dtype)
        for t0 in range(0, a.shape[0], step):
            result[t0 : t0 + step] = (matrix @ a[t0 : t0 + step].t()).t()
        return result


def _token_chunk(n_tokens: int, width: int) -> int:
    """Tokens per chunk of a CSR product or SDDMM whose copies are `width` entries per token: ≤ _BLOCK_ELEMENTS
    entries, and ≤ an eighth of the call's tokens (at least 16), so that with few tokens, where a layer's
    activations are small, its transients stay small beside them (the 1 × 128-token rows of
    `python benchmarks/peak.py` are where that shows)."""
    return min(max(1, _BLOCK_ELEMENTS // width), max(16, n_tokens // 8))


def _exact(t: torch.Tensor):
    """A context in which the sparse products run in their operands' dtype: under autocast (a bf16 mixed
    precision run) torch would cast a CSR product to bf16, which its CPU kernels do not implement (and which
    would round the update). A no-op outside autocast, the common case, at no cost per call."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _use_csr(layout: "Layout | None", a: torch.Tensor, values: torch.Tensor) -> bool:
    return layout is not None and a.dtype == values.dtype and csr_works(values.device, values.dtype)


def _rows_cols(indices: torch.Tensor, in_features: int, layout: "Layout | None"):
    return layout.rows_cols() if layout is not None else split_flat(indices, in_features)


def _sparse(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size, coalesced: bool) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, size, is_coalesced=coalesced, check_invariants=False
    )


def sampled_grad(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dtype) -> torch.Tensor:
    """(dyᵀ x)[rows[j], cols[j]] for every j, without ever forming the dense out×in product (an SDDMM).

    dy: (N, out), x: (N, in). Works in chunks of the support so that the temporaries stay bounded.
    """
    n = max(dy.shape[0], 1)
    chunk = max(1, _BLOCK_ELEMENTS // n)
    out = torch.empty(rows.numel(), dtype=dtype, device=dy.device)
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        out[start : start + chunk] = (dy.index_select(1, r).to(dtype) * x.index_select(1, c).to(dtype)).sum(0)
    return out


def csr_grad(dy: torch.Tensor, x: torch.Tensor, layout: Layout, dtype) -> torch.Tensor:
    """(dyᵀ x) at the layout's support, in the support's order, by torch.sparse.sampled_addmm over its CSR
    pattern: one dot product over the tokens per entry, nothing of out × in.

    The kernel reads dyᵀ row-major and x column-major (other layouts it copies whole, unbounded): the tokens go
    in chunks of ≤ _BLOCK_ELEMENTS // (out + in), each transposed into those layouts, accumulated with beta=1.
    `python benchmarks/csr_timings.py` (kernels table, 2 threads, 2752 × 1024 at LoRA r=8's count): 1,024 tokens
    7.7 ms and 1.73 MiB, 128 tokens 1.7 ms and 0.96 MiB, against 18.2 / 2.4 ms and 10.98 MiB for the dense dyᵀx
    read at the support."""
    n, out_features = dy.shape
    in_features = x.shape[1]
    crow, col = layout.csr(out_features)
    values = torch.zeros(col.numel(), dtype=dtype, device=dy.device)
    acc = torch.sparse_csr_tensor(crow, col, values, (out_features, in_features), check_invariants=False)
    step = _token_chunk(n, out_features + in_features)
    with _exact(dy):
        for t0 in range(0, n, step):
            acc = torch.sparse.sampled_addmm(acc, _transposed(dy[t0 : t0 + step], dtype), _transposed(x[t0 : t0 + step], dtype).t())
    return acc.values()


def _transposed(t: torch.Tensor, dtype) -> torch.Tensor:
    """tᵀ as a fresh row-major tensor of `dtype`: one copy, whatever t's dtype and layout."""
    return torch.empty(t.shape[1], t.shape[0], dtype=dtype, device=t.device).copy_(t.t())


def row_blocks(indices: torch.Tensor, out_features: int, in_features: int, every_block: bool = False):
    """Split (out × in) into blocks of whole rows of at most _BLOCK_ELEMENTS entries.

    Yields (r0, r1, a, b, local): rows r0:r1 hold the support entries a:b (indices are sorted),
    at flat positions `local` within the block. Blocks without support entries are skipped unless
    `every_block` (a caller that needs the whole dense gradient, e.g. for a low-rank part).
    """
    step = max(1, _BLOCK_ELEMENTS // in_features)
    if step >= out_features or torch.compiler.is_compiling():
        # One block: its bounds are known without looking at the indices (no host sync on a GPU).
        # Under torch.compile every layer is one block, as the bounds of several would break the
        # graph: the transient is then a whole out×in block, like the fused path's scratch weight.
        yield 0, out_features, 0, indices.numel(), indices.long()
        return
    starts = torch.arange(0, out_features + step, step, device=indices.device).clamp_(max=out_features)
    bounds = torch.searchsorted(indices.long(), starts * in_features).tolist()
    for i, r0 in enumerate(range(0, out_features, step)):
        a, b = bounds[i], bounds[i + 1]
        if a < b or every_block:
            yield r0, min(r0 + step, out_features), a, b, indices[a:b].long() - r0 * in_features


def _dense_rows(values, local, rows: int, in_features: int) -> torch.Tensor:
    return values.new_zeros(rows * in_features).index_put_((local,), values).view(rows, in_features)


def grad_at(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, dtype, layout: "Layout | None" = None) -> torch.Tensor:
    """(dyᵀ x).flatten()[indices]: the weight gradient at a sorted set of flat positions.

    dy: (N, out), x: (N, in). With a `layout` and a dtype torch's SDDMM takes (CPU fp32/fp64), `csr_grad`.
    Else a sampled product (O(N·k), temporaries of ≤ 3·_BLOCK_ELEMENTS entries) unless `product_mode` says
    "dense"; then the dense gradient dyᵀx is formed one block of rows (≤ _BLOCK_ELEMENTS entries) at a time
    and read at the support.
    """
    out_features, in_features = dy.shape[1], x.shape[1]
    if layout is not None and sddmm_works(dy.device, dtype):
        return csr_grad(dy, x, layout, dtype)
    if product_mode(dy.shape[0], indices.numel(), out_features, in_features) != "dense":
        return sampled_grad(dy, x, *_rows_cols(indices, in_features, layout), dtype)
    grad = torch.empty(indices.numel(), dtype=dtype, device=dy.device)
    x = x.to(dtype)
    for r0, r1, a, b, local in row_blocks(indices, out_features, in_features):
        grad[a:b] = (dy[:, r0:r1].to(dtype).t() @ x).view(-1)[local]
    return grad


def _times_delta(a, values, indices, shape, transpose: bool, mode: str, layout: "Layout | None" = None) -> torch.Tensor:
    """a Δᵀ (a: N × in) or, with `transpose`, a Δ (a: N × out), for Δ of `shape` (out, in)."""
    out_features, in_features = shape
    if _use_csr(layout, a, values):
        if not transpose:
            return csr_times(a, values, layout, out_features)
        # a Δ = (Δᵀ aᵀ)ᵀ over Δᵀ's pattern: 1 thread, 1,024 tokens, 2752 × 1024 at 1.1%: 10 ms against 47 ms
        # for dense row blocks (1024² at 1.6%: 4.8 against 18 ms)
        ptr, rows, order = layout.csr_t(out_features)
        delta_t = torch.sparse_csr_tensor(ptr, rows, values.detach()[order], (in_features, out_features), check_invariants=False)
        return _csr_rows(delta_t, a)
    if mode == "gather":
        rows, cols = _rows_cols(indices, in_features, layout)
        src, dst = (rows, cols) if transpose else (cols, rows)
        # int64 indices: with repeated int32 ones index_add_ is ~25x slower on CPU (benchmarks/layer_timings.py)
        result = a.new_zeros((a.shape[0], in_features if transpose else out_features))
        return result.index_add_(1, dst, a.index_select(1, src) * values)
    if mode == "sparse":
        rows, cols = _rows_cols(indices, in_features, layout)
        if transpose:  # Δᵀ's pattern is not row-major: let torch sort it
            delta = _sparse(cols, rows, values, (in_features, out_features), coalesced=False)
        else:
            delta = _sparse(rows, cols, values, shape, coalesced=True)
        return torch.sparse.mm(delta, a.t()).t()
    result = a.new_zeros((a.shape[0], in_features if transpose else out_features))
    for r0, r1, start, end, local in row_blocks(indices, out_features, in_features):
        block = _dense_rows(values[start:end], local, r1 - r0, in_features)
        if transpose:
            result += a[:, r0:r1] @ block
        else:
            result[:, r0:r1] = a @ block.t()
    return result


class SparseLinear(Function):
    """Update of an unstructured sparse Δ: Δ.flatten()[indices[j]] = values[j], zero elsewhere, times
    `scale`; plus, if given, a low-rank part scaling · B A (A: r × in, B: out × r; DSEE, SLTrain, RoSA).

    Saves x (the gradient at the support, dv_j = Σ_n dy[n, row_j] · x[n, col_j], needs the
    columns it touches, which at any useful density is all of them; A's and B's need it too),
    references to values, A and B (for dx), and the flat indices, which must be sorted and unique.
    The low-rank part lives in the same function so that its output and its dx are added in place
    to the sparse part's (addmm): two separate functions would hold one N × out and one N × in tensor
    more at once, which with few tokens is most of what a step holds beyond LoRA's.

    Nothing of size out×in is saved or lives past a call; what is formed within one depends on the
    path (CSR products and torch's SDDMM, or per `product_mode` a gather, sparse kernels, or dense
    row blocks of ≤ _BLOCK_ELEMENTS entries): see the module docstring.

    `probe`, if given, is called in backward as probe(dy, x) with dy (N × out, the gradient of the
    sparse part's output) and x (N × in): a way for a schedule to look at gradients outside the
    support (SpIEL's regrowth) without this function knowing why.
    """

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int, probe=None, layout=None, scale=1.0,
                lora_a=None, lora_b=None, scaling=1.0):
        shape = (out_features, x.shape[-1])
        x2 = _rows2d(x)
        ctx.mode = product_mode(x2.shape[0], values.numel(), *shape)
        y = _times_delta(x2.to(values.dtype), values, indices, shape, False, ctx.mode, layout)
        if lora_a is not None:  # scale · y + scaling · h Bᵀ in one kernel (the scale as addmm's beta)
            with _exact(x2):  # in the adapter's dtype, as the sparse part: autocast would give a bf16 h to add into y
                h = x2.to(lora_a.dtype) @ lora_a.t()
                if y.is_contiguous():
                    y = y.addmm_(h, lora_b.t(), beta=scale, alpha=scaling)
                else:
                    y = torch.addmm(y, h, lora_b.t(), beta=scale, alpha=scaling)
        elif scale != 1.0:
            y = y.mul_(scale) if y.is_contiguous() else y * scale
        keep_x = ctx.needs_input_grad[1] or probe is not None or (lora_a is not None and any(ctx.needs_input_grad[7:9]))
        ctx.save_for_backward(x if keep_x else None, values, indices, lora_a, lora_b)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.probe, ctx.layout, ctx.scale, ctx.scaling = probe, layout, scale, scaling
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, lora_a, lora_b = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = _rows2d(dy).to(values.dtype)
        with _exact(dy2):
            return SparseLinear._backward(ctx, dy2, x, values, indices, lora_a, lora_b, x_shape, x_dtype)

    @staticmethod
    def _backward(ctx, dy2, x, values, indices, lora_a, lora_b, x_shape, x_dtype):
        shape = (dy2.shape[1], x_shape[-1])
        scale = ctx.scale
        if ctx.probe is not None:  # first: its transients (a weight-gradient block, a pool merge) come and go
            # before dx and the gradients exist, not on top of them (RoSA's warm-up, SpIEL's window)
            _run_probe(ctx.probe, dy2 if scale == 1.0 else dy2 * scale, _rows2d(x))
        dx = dvalues = da = db = None
        g = None if lora_a is None else (dy2.to(lora_b.dtype) @ lora_b) * ctx.scaling  # gradient at h = x Aᵀ, N × r
        if ctx.needs_input_grad[0]:
            dx = _times_delta(dy2, values, indices, shape, True, ctx.mode, ctx.layout)
            if g is not None:
                dx = dx.addmm_(g, lora_a, beta=scale) if dx.is_contiguous() else torch.addmm(dx, g, lora_a, beta=scale)
            elif scale != 1.0:
                dx = dx.mul_(scale) if dx.is_contiguous() else dx * scale
            dx = dx.reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dvalues = grad_at(dy2, _rows2d(x), indices, values.dtype, ctx.layout)
            if scale != 1.0:
                dvalues.mul_(scale)
        if g is not None and (ctx.needs_input_grad[7] or ctx.needs_input_grad[8]):
            x2 = _rows2d(x).to(lora_a.dtype)
            if ctx.needs_input_grad[7]:
                da = g.t() @ x2
            if ctx.needs_input_grad[8]:
                db = (dy2.to(lora_b.dtype).t() @ (x2 @ lora_a.t())).mul_(ctx.scaling)
        return dx, dvalues, None, None, None, None, None, da, db, None


class MergedSparseLinear(Function):
    """The whole layer, x (W + Δ)ᵀ + b, for a frozen dense W and an unstructured Δ (optionally plus
    a low-rank scaling·B·A, as DSEE and SLTrain have), one GEMM per block of rows per pass.

    The sparse update alone costs a second product per pass (`SparseLinear`); folding Δ into a
    scratch copy of W costs a copy instead, which is cheaper when the GEMM dominates and no CSR
    kernel applies (a prompt at inference, bf16 on CPU). The copy is made one block of rows at a time
    (`_merged_blocks`: ≤ _BLOCK_ELEMENTS entries, in W's dtype), in forward and again in backward,
    never kept: what is saved is x (for the gradient at the support) and references to W, b, values,
    indices, A and B. W and b get no gradient. With a low-rank part, backward forms the weight
    gradient G = dyᵀx one block of rows at a time (every block, whatever the density) and reads all
    three gradients off it (values: G at the support; B: G·Aᵀ; A: Bᵀ·G), so the low-rank part costs
    r·out·in, not extra passes over the tokens. Nothing of out × in is formed (beyond one block for
    a layer of ≤ _BLOCK_ELEMENTS entries; under torch.compile, one block is the whole layer).
    W and values must share a dtype, so that no small delta is rounded away in the copy.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, probe=None, lora_a=None, lora_b=None, scaling=1.0):
        y = linear_by_blocks(x, _merged_blocks(weight, values, indices, lora_a, lora_b, scaling), weight.shape[0], bias)
        keep_x = ctx.needs_input_grad[3] or probe is not None or (lora_a is not None and any(ctx.needs_input_grad[6:8]))
        ctx.save_for_backward(x if keep_x else None, weight, values, indices, lora_a, lora_b)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.probe, ctx.scaling = probe, scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, indices, lora_a, lora_b = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = _rows2d(dy)
        if ctx.probe is not None:  # first, as in SparseLinear
            _run_probe(ctx.probe, dy2.to(values.dtype), _rows2d(x))
        dx = dvalues = da = db = None
        if ctx.needs_input_grad[0]:
            blocks = _merged_blocks(weight, values, indices, lora_a, lora_b, ctx.scaling)
            dx = input_grad_by_blocks(dy2.to(weight.dtype), blocks, x_shape[-1]).reshape(x_shape).to(x_dtype)
        if lora_a is not None and any(ctx.needs_input_grad[6:8]):
            dvalues, da, db = _grads_from_blocks(dy2.to(values.dtype), _rows2d(x), indices, lora_a, lora_b, ctx.scaling)
        elif ctx.needs_input_grad[3]:
            dvalues = grad_at(dy2.to(values.dtype), _rows2d(x), indices, values.dtype)
        return dx, None, None, dvalues, None, None, da, db, None


def linear_by_blocks(x: torch.Tensor, blocks, out_features: int, bias=None) -> torch.Tensor:
    """x Wᵀ + b for a W given as its blocks of rows, (r0, r1, W[r0:r1]) as the iterator makes them: each block is
    used and dropped, so the whole W never exists. A W of one block is one F.linear."""
    y = None
    for r0, r1, w in blocks:
        if r1 - r0 == out_features:
            return torch.nn.functional.linear(x, w, bias)
        if y is None:
            y = x.new_empty(*x.shape[:-1], out_features, dtype=torch.result_type(x, w))
        y[..., r0:r1] = torch.nn.functional.linear(x, w, None if bias is None else bias[r0:r1])
    return y


def input_grad_by_blocks(dy: torch.Tensor, blocks, in_features: int) -> torch.Tensor:
    """dy W (dy: N × out) for a W given as its blocks of rows, as in linear_by_blocks: N × in, summed block by block."""
    dx = dy.new_zeros(dy.shape[0], in_features)
    for r0, r1, w in blocks:
        dx.addmm_(dy[:, r0:r1], w)
    return dx


def _merged_blocks(weight, values, indices, lora_a=None, lora_b=None, scaling=1.0):
    """(r0, r1, W[r0:r1] + Δ[r0:r1] (+ scaling·B[r0:r1]·A)) for each block of rows: fresh copies in W's dtype,
    each ≤ _BLOCK_ELEMENTS entries (see row_blocks), made as the caller takes them."""
    values = values.detach()
    for r0, r1, a, b, local in row_blocks(indices, weight.shape[0], weight.shape[1], every_block=True):
        block = weight[r0:r1].detach().clone()
        if a < b:
            block.view(-1).index_put_((local,), values[a:b], accumulate=True)
        if lora_a is not None:
            block.addmm_(lora_b[r0:r1].detach(), lora_a.detach(), alpha=scaling)
        yield r0, r1, block


def _grads_from_blocks(dy, x, indices, lora_a, lora_b, scaling):
    """Gradients of values (at the support), A and B from G = dyᵀx, built one block of rows at a time
    (≤ _BLOCK_ELEMENTS entries each; the next block is formed before the last one is dropped)."""
    out_features, in_features = dy.shape[1], x.shape[1]
    x = x.to(dy.dtype)
    dvalues = torch.empty(indices.numel(), dtype=dy.dtype, device=dy.device)
    da, db = torch.zeros_like(lora_a), torch.empty_like(lora_b)
    for r0, r1, a, b, local in row_blocks(indices, out_features, in_features, every_block=True):
        g = dy[:, r0:r1].t() @ x  # (rows × in), the weight gradient of these rows
        if a < b:
            dvalues[a:b] = g.view(-1)[local]
        db[r0:r1] = (g @ lora_a.t()) * scaling
        da.addmm_(lora_b[r0:r1].t(), g, alpha=scaling)
    return dvalues, da, db


class RowLinear(Function):
    """Update of trainable output rows: Δ[rows, :] = block (s × in), zero elsewhere.

    Saves x: the block's gradient dy[:, rows]ᵀ x needs every input column, so rows save
    gradient and optimizer memory but no activation memory.
    """

    @staticmethod
    def forward(ctx, x, block, rows, out_features: int, span=None):
        x2 = _rows2d(x)
        y = x2.new_zeros((x2.shape[0], out_features), dtype=block.dtype)
        if span is not None:  # the rows are one contiguous range: slice instead of scatter
            y[:, span[0] : span[1]] = x2.to(block.dtype) @ block.t()
        else:
            # rows are unique: a copy. int64 indices: with int32 ones index_add_ is 1.6-2.6x slower on CPU
            y.index_add_(1, rows.long(), x2.to(block.dtype) @ block.t())
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, block, rows)
        ctx.x_meta, ctx.span = (x.shape, x.dtype), span
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, block, rows = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        span = ctx.span
        dy2 = _rows2d(dy)
        dy_rows = (dy2[:, span[0] : span[1]] if span is not None else dy2.index_select(1, rows)).to(block.dtype)
        dx = dblock = None
        if ctx.needs_input_grad[0]:
            dx = (dy_rows @ block).reshape(x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dblock = dy_rows.t() @ _rows2d(x).to(block.dtype)
        return dx, dblock, None, None, None


class ColumnLinear(Function):
    """Update of trainable input columns: Δ[:, cols] = block (out × s), zero elsewhere.

    Saves only x[..., cols], as a fresh copy made by index_select. A slice view would be smaller
    on paper but would pin the storage of the whole of x. This is the activation saving of S²FT:
    a layer that trains s of its in columns keeps s/in of its input. When the columns are one
    contiguous range (`span`), a slice copy replaces the gather and scatter (~2.5x faster on CPU).

    Given the frozen base layer's `weight` (and `bias`, of the block's dtype), the whole layer in one op:
    y = x Wᵀ + b + x[..., cols] blockᵀ, and in backward a single dx, dy W with the columns' part added into
    it in place. Apart, autograd sums two full dx tensors (the base layer's and this op's) into a third,
    all alive at once: on down_proj at 1 × 128 tokens that sum set S²FT's step peak (benchmarks/peak.py).
    W is saved as a reference (it exists anyway); nothing of x beyond its columns.
    """

    @staticmethod
    def forward(ctx, x, block, cols, span=None, weight=None, bias=None):
        x2 = _rows2d(x)
        # a copy either way (clone of the slice), never a view that would pin the whole of x
        x_sel = x2[:, span[0] : span[1]].clone() if span is not None else x2.index_select(1, cols)
        if weight is None:
            y = x_sel.to(block.dtype) @ block.t()
        else:
            y = torch.nn.functional.linear(x2, weight, bias).addmm_(x_sel, block.t())
        ctx.save_for_backward(x_sel if ctx.needs_input_grad[1] else None, block, cols, weight)
        ctx.x_meta, ctx.span = (x.shape, x.dtype), span
        return y.reshape(*x.shape[:-1], block.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_sel, block, cols, weight = ctx.saved_tensors
        x_shape, x_dtype = ctx.x_meta
        dy2 = _rows2d(dy).to(block.dtype)
        dx = dblock = None
        if ctx.needs_input_grad[0]:
            if weight is None:
                dx2 = dy2.new_zeros((dy2.shape[0], x_shape[-1]), dtype=x_dtype)
            else:
                dx2 = dy2 @ weight
            part = (dy2 @ block).to(x_dtype)
            if ctx.span is not None:
                dx2[:, ctx.span[0] : ctx.span[1]] += part
            else:
                dx2.index_add_(1, cols.long(), part)  # int64: see RowLinear
            dx = dx2.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dblock = dy2.t() @ x_sel.to(block.dtype)
        return dx, dblock, None, None, None, None


class LowRankLinear(Function):
    """Update of a low-rank Δ = scaling · B A, with A (r × in) and B (out × r).

    Saves x only. The rank-r activation h = x Aᵀ that B's gradient needs is recomputed in
    backward (one N·in·r product) instead of being kept, as two chained linear layers would.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float):
        h = _rows2d(x).to(lora_a.dtype) @ lora_a.t()
        y = h @ lora_b.t()
        if scaling != 1.0:
            y.mul_(scaling)  # in place: a second N × out tensor here would raise the forward's peak
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


# A probe keeps statistics of data-dependent size (a running top-n): under torch.compile it runs eagerly,
# a graph break in the backward of the steps that collect statistics (SpIEL's windows, RoSA's warm-up).
@torch.compiler.disable
def _run_probe(probe, dy: torch.Tensor, x: torch.Tensor) -> None:
    probe(dy, x)


def sparse_linear(x, values, indices, out_features: int, probe=None, layout=None, scale=1.0,
                  lora_a=None, lora_b=None, scaling=1.0) -> torch.Tensor:
    """scale · x Δᵀ (+ scaling · x Aᵀ Bᵀ). `scale` on the product: no k-sized copy of the values, and no N × out
    one of dy in backward."""
    if not torch.is_grad_enabled():  # inference: the product alone, no autograd node (and no backward for a probe)
        return SparseLinear.forward(_NoContext(), x, values, indices, out_features, None, layout, scale,
                                    lora_a, lora_b, scaling)
    return SparseLinear.apply(x, values, indices, out_features, probe, layout, scale, lora_a, lora_b, scaling)


def decode_add(y: torch.Tensor, v: torch.Tensor, values, layout: Layout, scale=1.0, lora_a=None, lora_b=None,
               scaling=1.0) -> None:
    """y += scale · Δ v (+ scaling · B A v) in place, for one token at inference (y: out, v: in): one sparse
    matrix-vector product (plus two thin ones for a low-rank part) added into y, the base layer's own output
    (Delta.decode_add; the caller has checked the dtypes and the CSR kernel, and holds autocast off)."""
    if lora_a is not None:
        decode_low_rank(y, v, lora_a, lora_b, scaling)
    y.addmv_(_csr_matrix(values, layout, y.shape[0], v.shape[0]), v, alpha=scale)


def decode_low_rank(y: torch.Tensor, v: torch.Tensor, lora_a, lora_b, scaling=1.0) -> None:
    """y += scaling · B A v: two thin matrix-vector products, the second added into y."""
    y.addmv_(lora_b, torch.mv(lora_a, v), alpha=scaling)


def decode_rows(y: torch.Tensor, v: torch.Tensor, block, rows, span=None, scale=1.0) -> None:
    """y[rows] += scale · block v (block: len(rows) × in), the rows a slice where they are one range."""
    if span is not None:
        y[span[0] : span[1]].addmv_(block, v, alpha=scale)
    else:
        y.index_add_(0, rows, torch.mv(block, v), alpha=scale)


def decode_columns(y: torch.Tensor, v: torch.Tensor, block, cols, span=None, scale=1.0) -> None:
    """y += scale · block v[cols] (block: out × len(cols)), the columns a slice where they are one range."""
    y.addmv_(block, v[span[0] : span[1]] if span is not None else v.index_select(0, cols), alpha=scale)


def merged_sparse_linear(x, weight, bias, values, indices, probe=None, lora_a=None, lora_b=None, scaling=1.0):
    return MergedSparseLinear.apply(x, weight, bias, values, indices, probe, lora_a, lora_b, scaling)


def row_linear(x, block, rows, out_features: int, span=None) -> torch.Tensor:
    if not torch.is_grad_enabled():  # inference: the same forward, without an autograd node
        return RowLinear.forward(_NoContext(), x, block, rows, out_features, span)
    return RowLinear.apply(x, block, rows, out_features, span)


def column_linear(x, block, cols, span=None, weight=None, bias=None) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return ColumnLinear.forward(_NoContext(), x, block, cols, span, weight, bias)
    return ColumnLinear.apply(x, block, cols, span, weight, bias)


class _NoContext:
    """What a Function's forward may write to when it is called directly, at inference: nothing is kept."""

    needs_input_grad = (False,) * 16

    def save_for_backward(self, *tensors) -> None:
        pass


def contiguous_span(indices: torch.Tensor):
    """(start, stop) if sorted unique indices form one range start..stop-1, else None. Syncs with the device."""
    if indices.numel() == 0:
        return None
    start, stop = int(indices[0]), int(indices[-1]) + 1
    return (start, stop) if stop - start == indices.numel() else None


def low_rank_linear(x, lora_a, lora_b, scaling: float) -> torch.Tensor:
    if not torch.is_grad_enabled():  # inference: two thin products, no autograd node
        y = torch.nn.functional.linear(torch.nn.functional.linear(x.to(lora_a.dtype), lora_a), lora_b)
        return y * scaling if scaling != 1.0 else y
    return LowRankLinear.apply(x, lora_a, lora_b, scaling)
