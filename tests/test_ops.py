"""The autograd functions: gradcheck in float64, dense reference math, and what they save."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.autograd import gradcheck

from sparse_peft import ops
from sparse_peft.delta import Delta
from sparse_peft.selection import random_subset

from .largest import LargestCreated


OUT, IN = 7, 5
D = torch.float64


def _support(k, seed=0):
    flat = random_subset(OUT * IN, k, seed)
    return flat, flat // IN, flat % IN


def _x(dtype=D, grad=True):
    return torch.randn(2, 3, IN, dtype=dtype, requires_grad=grad)


@pytest.fixture(params=["dense-blocks", "many-blocks", "sparse-kernels", "gather"])
def kernel_path(request, monkeypatch):
    """SparseLinear's three strategies, and row blocks much smaller than the matrix."""
    monkeypatch.setattr(ops, "GATHER_BELOW", 1e9 if request.param == "gather" else 0.0)
    if request.param == "sparse-kernels":
        monkeypatch.setattr(ops, "SPARSE_KERNEL_BELOW_DENSITY", 1.1)
    if request.param == "many-blocks":
        monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 2 * IN)
    return request.param


def test_gradcheck_sparse(kernel_path):
    flat, _, _ = _support(9)
    v = torch.randn(9, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, v: ops.sparse_linear(x, v, flat.int(), OUT), (_x(), v))


def test_gradcheck_rows():
    rows = torch.tensor([1, 4], dtype=torch.int32)
    block = torch.randn(2, IN, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, b: ops.row_linear(x, b, rows, OUT), (_x(), block))


def test_gradcheck_columns():
    cols = torch.tensor([0, 3], dtype=torch.int32)
    block = torch.randn(OUT, 2, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, b: ops.column_linear(x, b, cols), (_x(), block))


@pytest.mark.parametrize("span", [None, (1, 3)])
def test_gradcheck_columns_with_the_frozen_base_in_one_op(span):
    # the whole layer: x Wᵀ + b + x[:, cols] blockᵀ, W and b frozen, against the dense float64 math
    cols = torch.tensor([0, 3] if span is None else [1, 2], dtype=torch.int32)
    block = torch.randn(OUT, 2, dtype=D, requires_grad=True)
    w, b = torch.randn(OUT, IN, dtype=D), torch.randn(OUT, dtype=D)
    assert gradcheck(lambda x, blk: ops.column_linear(x, blk, cols, span, w, b), (_x(), block))
    x = _x()
    dense = w.clone()
    dense[:, cols.long()] += block.detach()
    torch.testing.assert_close(ops.column_linear(x, block, cols, span, w, b), x @ dense.t() + b)


def test_the_column_op_with_its_base_forms_one_dx():
    # apart, autograd sums the base layer's dx and the update's into a third N × in tensor; in one op dx is one
    from sparse_peft.memory import peak_memory

    n, out_f, in_f = 256, 64, 512
    x = torch.randn(n, in_f, requires_grad=True)
    w, dy = torch.randn(out_f, in_f), torch.randn(n, out_f)
    block, cols = torch.zeros(out_f, 8, requires_grad=True), torch.arange(0, in_f, 64)
    peaks = []
    for forward in (lambda: torch.nn.functional.linear(x, w) + ops.column_linear(x, block, cols),
                    lambda: ops.column_linear(x, block, cols, None, w)):
        x.grad = block.grad = None
        with peak_memory() as peak:
            forward().backward(dy)
        peaks.append(peak.bytes)
    one_dx = n * in_f * 4
    assert peaks[0] - peaks[1] >= 1.9 * one_dx


def test_gradcheck_low_rank():
    a = torch.randn(3, IN, dtype=D, requires_grad=True)
    b = torch.randn(OUT, 3, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, a, b: ops.low_rank_linear(x, a, b, 0.7), (_x(), a, b))


def _delta_cases():
    torch.manual_seed(1)
    flat, _, _ = _support(11, seed=3)
    yield "sparse", Delta(OUT, IN, values=torch.randn(11, dtype=D), indices=flat.int())
    yield "rows", Delta(OUT, IN, row_block=torch.randn(3, IN, dtype=D), row_index=torch.tensor([0, 2, 6]))
    yield "columns", Delta(OUT, IN, col_block=torch.randn(OUT, 2, dtype=D), col_index=torch.tensor([1, 4]))
    yield "low-rank", Delta(OUT, IN, lora_A=torch.randn(2, IN, dtype=D), lora_B=torch.randn(OUT, 2, dtype=D), scaling=0.5)
    yield "sparse+low-rank", Delta(
        OUT, IN, values=torch.randn(11, dtype=D), indices=flat.int(),
        lora_A=torch.randn(2, IN, dtype=D), lora_B=torch.randn(OUT, 2, dtype=D), scaling=2.0,
    )


def _trainables(delta):
    return [t for t in (delta.values, delta.row_block, delta.col_block, delta.lora_A, delta.lora_B) if t is not None]


def _dense_reference(name, delta):
    """ΔW built entry by entry in plain Python, independent of the code under test."""
    w = torch.zeros(OUT, IN, dtype=D)
    if delta.values is not None:
        for f, v in zip(delta.indices.tolist(), delta.values.tolist()):
            w[f // IN, f % IN] += v
    if delta.row_block is not None:
        for i, r in enumerate(delta.row_index.tolist()):
            w[r] += delta.row_block[i].detach()
    if delta.col_block is not None:
        for j, c in enumerate(delta.col_index.tolist()):
            w[:, c] += delta.col_block[:, j].detach()
    if delta.lora_A is not None:
        w += delta.scaling * delta.lora_B.detach() @ delta.lora_A.detach()
    return w


@pytest.mark.parametrize("name,delta", list(_delta_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_matches_dense_math(name, delta, kernel_path):
    # fresh leaves for each run: the cases are shared between parametrizations
    trainable = ("values", "row_block", "col_block", "lora_A", "lora_B")
    fresh = {f: getattr(delta, f).detach().clone().requires_grad_(True) for f in trainable if getattr(delta, f) is not None}
    delta = dataclasses.replace(delta, **fresh)
    w_ref = _dense_reference(name, delta)
    assert torch.allclose(delta.dense().detach(), w_ref)

    x = _x()
    y = delta.apply(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w_ref.t()
    assert torch.allclose(y, y_ref)

    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.allclose(x.grad, x_ref.grad)
    # the gradient of every trainable tensor equals dense dW = dyᵀx pulled back through ΔW's parameterisation
    dense_grad = dy.reshape(-1, OUT).t() @ x.detach().reshape(-1, IN)
    w = delta.dense()  # differentiable in the trainable tensors
    expected = torch.autograd.grad(w, _trainables(delta), dense_grad)
    for t, g in zip(_trainables(delta), expected):
        assert torch.allclose(t.grad, g), name


def _saved(fn):
    """Bytes of every distinct storage autograd saves during fn(), excluding the given parameters."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


def test_column_op_saves_only_a_fresh_copy_of_the_selected_columns():
    x = torch.randn(4, 16, 64, requires_grad=True)
    cols = torch.tensor([3, 10, 40, 63])
    block = torch.randn(32, 4, requires_grad=True)
    _, seen = _saved(lambda: ops.column_linear(x, block, cols))
    big = [t for t in seen.values() if t.dtype.is_floating_point and t is not block]
    assert len(big) == 1
    (x_sel,) = big
    assert x_sel.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert x_sel.untyped_storage().nbytes() == 4 * 16 * 4 * x.element_size()
    assert torch.equal(x_sel, x.detach().reshape(-1, 64)[:, cols])


@pytest.mark.parametrize("kind", ["sparse", "rows", "low-rank"])
def test_other_ops_save_x_itself_in_its_own_dtype(kind):
    # a bf16 input with fp32 trainable tensors: the saved x must be the bf16 input, not an fp32 copy
    x = torch.randn(4, 8, IN, dtype=torch.bfloat16, requires_grad=True)
    flat, rows, cols = _support(9)
    params = {
        "sparse": lambda: ops.sparse_linear(x, torch.zeros(9, requires_grad=True), flat, OUT),
        "rows": lambda: ops.row_linear(x, torch.zeros(2, IN, requires_grad=True), torch.tensor([1, 3]), OUT),
        "low-rank": lambda: ops.low_rank_linear(x, torch.zeros(2, IN, requires_grad=True), torch.zeros(OUT, 2, requires_grad=True), 1.0),
    }
    _, seen = _saved(params[kind])
    activations = [t for t in seen.values() if t.dtype.is_floating_point and t.shape[:1] == x.shape[:1]]
    assert [t.untyped_storage().data_ptr() for t in activations] == [x.untyped_storage().data_ptr()]


def test_frozen_values_save_no_activation_and_skip_their_gradient():
    x = _x()
    flat, _, _ = _support(5)
    v = torch.randn(5, dtype=D)  # not trainable
    y, seen = _saved(lambda: ops.sparse_linear(x, v, flat, OUT))
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in seen.values())
    y.sum().backward()
    assert x.grad is not None


def test_input_without_grad_gets_none_and_params_still_train():
    x = _x(grad=False)
    block = torch.randn(OUT, 2, dtype=D, requires_grad=True)
    ops.column_linear(x, block, torch.tensor([0, 1])).sum().backward()
    assert x.grad is None and block.grad is not None


def test_low_precision_matches_float64(kernel_path):
    flat, rows, cols = _support(12)
    v = torch.randn(12)
    x = torch.randn(3, IN)
    ref = ops.sparse_linear(x.double(), v.double(), flat, OUT)
    for dtype in (torch.float16, torch.bfloat16):
        y = ops.sparse_linear(x.to(dtype), v, flat, OUT)
        assert y.dtype == torch.float32  # computed in the adapter's dtype
        assert torch.allclose(y.double(), ref, atol=2e-2, rtol=2e-2)


def test_random_subset_is_sorted_unique_deterministic():
    a = random_subset(10_000, 300, seed=5)
    assert torch.equal(a, random_subset(10_000, 300, seed=5))
    assert not torch.equal(a, random_subset(10_000, 300, seed=6))
    assert a.numel() == 300 and bool((a[1:] > a[:-1]).all()) and int(a.max()) < 10_000
    # not biased towards small indices (the dedup step sorts)
    assert a.float().mean() > 3000
    assert torch.equal(random_subset(10, 10, seed=0), torch.arange(10))


def test_gradcheck_merged_layer(kernel_path):
    flat, _, _ = _support(9)
    w, b = torch.randn(OUT, IN, dtype=D), torch.randn(OUT, dtype=D)
    v = torch.randn(9, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, v: ops.merged_sparse_linear(x, w, b, v, flat.int()), (_x(), v))
    # and it is the frozen layer plus the sparse update
    x = _x(grad=False)
    expected = x @ w.t() + b + ops.sparse_linear(x, v, flat.int(), OUT)
    assert torch.allclose(ops.merged_sparse_linear(x, w, b, v, flat.int()), expected)


def test_gradcheck_merged_layer_with_a_low_rank_part(monkeypatch):
    # small row blocks, so that the blockwise weight gradient crosses block boundaries
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 2 * IN)
    flat, _, _ = _support(9)
    w, b = torch.randn(OUT, IN, dtype=D), torch.randn(OUT, dtype=D)
    v = torch.randn(9, dtype=D, requires_grad=True)
    a = torch.randn(3, IN, dtype=D, requires_grad=True)
    bb = torch.randn(OUT, 3, dtype=D, requires_grad=True)
    f = lambda x, v, a, bb: ops.merged_sparse_linear(x, w, b, v, flat.int(), None, a, bb, 0.5)  # noqa: E731
    assert gradcheck(f, (_x(), v, a, bb))
    x = _x(grad=False)
    expected = x @ w.t() + b + ops.sparse_linear(x, v, flat.int(), OUT) + ops.low_rank_linear(x, a, bb, 0.5)
    assert torch.allclose(f(x, v, a, bb), expected)


def test_group_selection_by_norm_with_exclusion():
    from sparse_peft.selection import select

    w = torch.zeros(3, 8)
    w[:, 0:2] = 5.0  # group 0: largest, but taken by another adapter
    w[:, 4:6] = 3.0  # group 2
    w[:, 6:8] = 2.0  # group 3
    taken = torch.tensor([0, 1])
    big = select("magnitude", "columns", 4, (3, 8), 0, lambda: w, group=2, exclude=taken)
    assert big.tolist() == [4, 5, 6, 7]
    small = select("small_magnitude", "columns", 2, (3, 8), 0, lambda: w, group=2, exclude=taken)
    assert small.tolist() == [2, 3]
    rand = select("random", "columns", 4, (3, 8), 0, group=2, exclude=taken)
    assert not set(rand.tolist()) & {0, 1} and rand.reshape(-1, 2)[:, 0].remainder(2).eq(0).all()
    with pytest.raises(ValueError, match="disjoint"):
        select("random", "columns", 8, (3, 8), 0, group=2, exclude=taken)


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_contiguous_span_fast_path_equals_the_gather_path(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    idx = torch.arange(3, 7)
    span = ops.contiguous_span(idx)
    assert span == (3, 7) and ops.contiguous_span(torch.tensor([1, 2, 4])) is None
    results = []
    for s in (None, span):
        block = (torch.randn(4, 12) if kind == "rows" else torch.randn(9, 4)).double().requires_grad_(True)
        torch.manual_seed(1)
        block.data.normal_()
        y = ops.row_linear(x, block, idx, 9, s) if kind == "rows" else ops.column_linear(x, block, idx, s)
        dx, db = torch.autograd.grad(y.pow(2).sum(), (x, block))
        results.append((y, dx, db))
    for a, b in zip(*results):
        assert torch.allclose(a, b)


def test_gradcheck_sparse_through_a_layout(kernel_path):
    # what a layer passes: the support's Layout, so the forward and dx are CSR products over its patterns
    flat, _, _ = _support(9)
    layout = ops.Layout(flat.int(), IN)
    v = torch.randn(9, dtype=D, requires_grad=True)
    assert ops.csr_works(v.device, D)
    assert gradcheck(lambda x, v: ops.sparse_linear(x, v, layout.indices, OUT, None, layout), (_x(), v))


@pytest.mark.parametrize("block", [None, 2 * (OUT + IN)])
def test_csr_grad_is_the_dense_gradient_at_the_support(block, monkeypatch):
    # torch's SDDMM over the layout's CSR pattern, the tokens in chunks (2 per chunk with the small bound)
    if block:
        monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", block)
    flat, rows, cols = _support(13)
    layout = ops.Layout(flat.int(), IN)
    dy, x = torch.randn(5, OUT, dtype=D), torch.randn(5, IN, dtype=torch.float32)
    assert ops.sddmm_works(dy.device, D) and not ops.sddmm_works(dy.device, torch.bfloat16)
    got = ops.grad_at(dy, x, flat.int(), D, layout)
    assert got.dtype == D
    torch.testing.assert_close(got, (dy.t() @ x.double())[rows, cols])
    # an empty support
    empty = ops.Layout(torch.zeros(0, dtype=torch.int32), IN)
    assert ops.grad_at(dy, x, empty.indices, D, empty).shape == (0,)


def test_fused_path_forms_no_whole_scratch_weight(monkeypatch):
    # several blocks of rows: forward and dx from block-wise W + Δ (+ s·B·A), never a whole out × in copy
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 3 * IN)
    flat, _, _ = _support(9)
    w, b = torch.randn(OUT, IN, dtype=D), torch.randn(OUT, dtype=D)
    v = torch.randn(9, dtype=D, requires_grad=True)
    a, bb = torch.randn(2, IN, dtype=D, requires_grad=True), torch.randn(OUT, 2, dtype=D, requires_grad=True)
    x = torch.randn(4, IN, dtype=D, requires_grad=True)
    with LargestCreated() as seen:
        y = ops.merged_sparse_linear(x, w, b, v, flat.int(), None, a, bb, 0.5)
        grads = torch.autograd.grad(y.pow(2).sum(), (x, v, a, bb))
    assert seen.largest[D] < OUT * IN
    ref = x @ (w + Delta(OUT, IN, values=v, indices=flat.int(), lora_A=a, lora_B=bb, scaling=0.5).dense()).t() + b
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, torch.autograd.grad(ref.pow(2).sum(), (x, v, a, bb))):
        torch.testing.assert_close(got, want)


def test_scratch_pays_only_where_no_kernel_beats_it():
    flat, _, _ = _support(9)
    layout = ops.Layout(flat.int(), IN)
    v = torch.zeros(9, requires_grad=True)
    many = 10_000
    # training with the CSR kernels and torch's SDDMM: a scratch W only when dense enough
    assert ops.scratch_pays(many, v, layout, OUT, IN, True)  # 9 of 35 entries
    big = ops.Layout(torch.arange(0, 10_000, 100, dtype=torch.int32), 100)  # 1% of 100 × 100
    assert not ops.scratch_pays(many, torch.zeros(100, requires_grad=True), big, 100, 100, True)
    # no layout (torch.compile) or bf16 on CPU: no CSR kernel, the fused path
    assert ops.scratch_pays(many, v, None, OUT, IN, True)
    assert ops.scratch_pays(many, v.detach().bfloat16().requires_grad_(), layout, OUT, IN, True)
    # inference: the copy once there are enough tokens to pay for it, never for a gather
    assert ops.scratch_pays(many, v, layout, OUT, IN, False)
    assert not ops.scratch_pays(1, v, layout, OUT, IN, False)
    assert ops.scratch_pays(many, torch.zeros(100), big, 100, 100, False)  # 10,000 tokens x 100 entries
    assert not ops.scratch_pays(100, torch.zeros(100), big, 100, 100, False)  # 100 tokens: the CSR product


def test_kernel_probes_and_products_ignore_autocast(monkeypatch):
    # asked first inside a bf16 autocast region (a mixed-precision Trainer run), the probes still answer for
    # fp32, and the CSR products run in fp32 there (torch would cast them to bf16, which its kernels lack)
    monkeypatch.setattr(ops, "_KERNEL_WORKS", {})
    flat, rows, cols = _support(9)
    layout = ops.Layout(flat.int(), IN)
    v = torch.randn(9, requires_grad=True)
    x = torch.randn(6, IN, requires_grad=True)
    a, b = torch.randn(2, IN, requires_grad=True), torch.randn(OUT, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.csr_works(v.device, torch.float32) and ops.sddmm_works(v.device, torch.float32)
        y = ops.sparse_linear(x, v, layout.indices, OUT, None, layout, 2.0, a, b, 0.5)  # with a low-rank part (DSEE)
        grads = torch.autograd.grad(y.pow(2).sum(), (x, v, a, b))
    dense = Delta(OUT, IN, values=v, indices=flat.int(), lora_A=a, lora_B=b, scaling=0.5, sparse_scale=2.0).dense()
    ref = x @ dense.t()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, torch.autograd.grad(ref.pow(2).sum(), (x, v, a, b))):
        torch.testing.assert_close(got, want)


def test_gradcheck_sparse_with_a_low_rank_part_in_one_op(kernel_path):
    # DSEE's, SLTrain's and RoSA's update: scale · x Δᵀ + scaling · x Aᵀ Bᵀ in one SparseLinear (added in place)
    flat, _, _ = _support(9)
    layout = ops.Layout(flat.int(), IN)
    v = torch.randn(9, dtype=D, requires_grad=True)
    a = torch.randn(2, IN, dtype=D, requires_grad=True)
    b = torch.randn(OUT, 2, dtype=D, requires_grad=True)
    for lay in (None, layout):
        f = lambda x, v, a, b: ops.sparse_linear(x, v, flat.int(), OUT, None, lay, 1.5, a, b, 0.5)  # noqa: E731
        assert gradcheck(f, (_x(), v, a, b))
        x = _x(grad=False)
        dense = Delta(OUT, IN, values=v, indices=flat.int(), lora_A=a, lora_B=b, scaling=0.5, sparse_scale=1.5).dense()
        with torch.no_grad():
            torch.testing.assert_close(f(x, v, a, b), x @ dense.t())


def test_one_token_at_inference_is_a_matrix_vector_product():
    # decoding's path (no grad, one token, a Layout): the same update as the general path and dense math
    flat, _, _ = _support(9)
    layout = ops.Layout(flat.int(), IN)
    v, a, b = torch.randn(9, dtype=D), torch.randn(2, IN, dtype=D), torch.randn(OUT, 2, dtype=D)
    dense = Delta(OUT, IN, values=v, indices=flat.int(), lora_A=a, lora_B=b, scaling=0.5, sparse_scale=1.5).dense()
    for x in (torch.randn(1, 1, IN, dtype=D), torch.randn(1, IN, dtype=D), torch.randn(IN, dtype=D)[None]):
        with torch.no_grad():
            got = ops.sparse_linear(x, v, layout.indices, OUT, None, layout, 1.5, a, b, 0.5)
        assert got.shape == (*x.shape[:-1], OUT)
        torch.testing.assert_close(got, x @ dense.t())


def test_a_sparse_kernel_that_does_not_run_is_said_once(monkeypatch, caplog):
    # correct either way, but a user on an unusual device should be able to learn why it is slower
    import logging

    monkeypatch.setattr(ops, "_KERNEL_WORKS", {})
    with caplog.at_level(logging.INFO, logger="sparse_peft"):
        assert not ops.sddmm_works(torch.device("cpu"), torch.bfloat16)
        assert not ops.sddmm_works(torch.device("cpu"), torch.bfloat16)  # asked again: answered from the cache
        assert ops.csr_works(torch.device("cpu"), torch.float32)
    said = [r for r in caplog.records if "does not run" in r.getMessage()]
    assert len(said) == 1 and "bfloat16" in said[0].getMessage() and "sddmm" in said[0].getMessage()
