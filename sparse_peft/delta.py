"""One adapter's weight update on one layer, and the arithmetic on it.

A `Delta` is a read-only view over the tensors that a layer stores for one adapter. Its update
ΔW (out × in, in linear orientation) is the sum of whichever parts are present:

- unstructured: `values` at flat row-major `indices` (int32, sorted, unique),
- rows:         a dense block (s × in) on the output rows `row_index`,
- columns:      a dense block (out × s) on the input columns `col_index`,
- low-rank:     scaling · lora_B @ lora_A.

The sparse parts are multiplied by `sparse_scale` (1, or DSEE's lora_alpha / r). An unstructured
part may have frozen slots (SaRA's progressive step): their values come from `frozen_values` and
get no gradient, whatever the trainable tensor holds there.

The layer owns the storage (PEFT needs it in per-adapter dicts); this module owns the math:
the forward update through `ops`, adding ΔW into a weight, and the checks a stored delta must pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from . import ops


# Names of the per-adapter tensors on a layer, as stored (and as they appear in adapter files).
VALUES, INDICES = "sparse_values", "sparse_indices"
ROW_BLOCK, ROW_INDEX = "sparse_row_block", "sparse_row_index"
COL_BLOCK, COL_INDEX = "sparse_col_block", "sparse_col_index"
LORA_A, LORA_B = "sparse_lora_A", "sparse_lora_B"
# slots of `sparse_values` that no longer train, and the values they keep (SaRA's progressive step)
FROZEN_SLOTS, FROZEN_VALUES = "sparse_frozen_slots", "sparse_frozen_values"
PARAMETER_NAMES = (VALUES, ROW_BLOCK, COL_BLOCK, LORA_A, LORA_B)
INDEX_NAMES = (INDICES, ROW_INDEX, COL_INDEX)
FROZEN_NAMES = (FROZEN_SLOTS, FROZEN_VALUES)
# which index tensor each parameter needs, and which one each structure uses
INDEX_OF = {VALUES: INDICES, ROW_BLOCK: ROW_INDEX, COL_BLOCK: COL_INDEX}
INDEX_OF_STRUCTURE = {"unstructured": INDICES, "rows": ROW_INDEX, "columns": COL_INDEX}


def index_dtype(numel: int) -> torch.dtype:
    """int32 while every index fits, int64 beyond 2³¹ elements."""
    return torch.int32 if numel < 2**31 else torch.int64


@dataclass
class Delta:
    out_features: int
    in_features: int
    values: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    row_block: Optional[torch.Tensor] = None
    row_index: Optional[torch.Tensor] = None
    col_block: Optional[torch.Tensor] = None
    col_index: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: float = 1.0
    sparse_scale: float = 1.0
    frozen_slots: Optional[torch.Tensor] = None
    frozen_values: Optional[torch.Tensor] = None
    # (start, stop) when row_index / col_index is one contiguous range: the ops slice instead of gathering
    row_span: Optional[tuple[int, int]] = None
    col_span: Optional[tuple[int, int]] = None
    # called with the gradient of the unstructured part's output during backward (see ops.SparseLinear)
    probe: Optional[object] = None
    # the support's rows and columns, made once per support by the layer (ops.Layout); None: made per call
    layout: Optional[ops.Layout] = None

    @property
    def is_empty(self) -> bool:
        return self.values is None and self.row_block is None and self.col_block is None and self.lora_A is None

    @property
    def reference(self) -> torch.Tensor:
        """The first stored trainable tensor: the dtype and device new tensors of this update take."""
        return next(t for t in (self.values, self.row_block, self.col_block, self.lora_A) if t is not None)

    @property
    def is_low_rank_only(self) -> bool:
        """Only scaling · B · A: no sparse part (an empty unstructured one counts as none)."""
        sparse = (self.values is not None and self.values.numel() > 0) or self.row_block is not None or self.col_block is not None
        return self.lora_A is not None and not sparse

    def effective_values(self, scaled: bool = True) -> Optional[torch.Tensor]:
        """The unstructured values as used: frozen slots overwritten (no gradient reaches them), and
        times `sparse_scale` unless `scaled=False` (the values as stored, for re-freezing)."""
        values = self.values
        if values is None:
            return None
        if self.frozen_slots is not None and self.frozen_slots.numel():
            values = values.index_put((self.frozen_slots.long(),), self.frozen_values.to(values.dtype))
        return values if not scaled or self.sparse_scale == 1.0 else values * self.sparse_scale

    def _scaled(self, block: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return block if block is None or self.sparse_scale == 1.0 else block * self.sparse_scale

    def sparse_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sparse part (values, rows, columns) as (flat row-major int64 positions, values), scaled
        as applied. Positions may repeat across parts; the sum over repeats is the update there."""
        ref = self.reference
        arange = lambda n: torch.arange(n, device=ref.device)  # noqa: E731
        positions, values = [ref.new_zeros(0, dtype=torch.int64)], [ref.new_zeros(0)]
        if self.values is not None:
            positions.append(self.indices.long())
            values.append(self.effective_values())
        if self.row_block is not None:
            positions.append((self.row_index.long()[:, None] * self.in_features + arange(self.in_features)).reshape(-1))
            values.append(self._scaled(self.row_block).reshape(-1))
        if self.col_block is not None:
            positions.append((arange(self.out_features)[:, None] * self.in_features + self.col_index.long()).reshape(-1))
            values.append(self._scaled(self.col_block).reshape(-1))
        return torch.cat(positions), torch.cat([v.to(ref.dtype) for v in values])

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        return ops._rows_cols(self.indices, self.in_features, self.layout)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x ΔWᵀ for x of shape (..., in), in the adapter's dtype, through the autograd ops."""
        y = None
        low_rank = self.lora_A is not None
        if self.values is not None and self.values.numel():
            # the scale (DSEE's alpha / r) inside the op, on the product, not on the values: no k-sized copy per
            # call, the stored values themselves reach the op (whose CSR matrix over them is kept between calls),
            # and backward forms no scaled copy of dy. A low-rank part joins the same op (added in place).
            lora = (self.lora_A, self.lora_B, self.scaling) if low_rank else ()
            y = ops.sparse_linear(x, self.effective_values(scaled=False), self.indices, self.out_features, self.probe,
                                  self.layout, self.sparse_scale, *lora)
            low_rank = False
        if self.row_block is not None:
            y = _add(y, ops.row_linear(x, self._scaled(self.row_block), self.row_index, self.out_features, self.row_span))
        if self.col_block is not None:
            y = _add(y, ops.column_linear(x, self._scaled(self.col_block), self.col_index, self.col_span))
        if low_rank:
            y = _add(y, ops.low_rank_linear(x, self.lora_A, self.lora_B, self.scaling))
        if y is None:  # an empty support (a threshold no entry of this layer passes)
            y = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.values.dtype)
        return y

    def decodes_into(self) -> bool:
        """Whether decode_add can add this update: every form but SaRA's after its progressive step (its values
        are then a copy with the frozen slots written in; the general path applies them), an unstructured part
        only where torch's CSR kernels run (the support's pattern, a Layout, is what they read)."""
        if self.frozen_slots is not None and self.frozen_slots.numel():
            return False
        if self.values is not None and self.values.numel():
            return self.layout is not None and ops.csr_works(self.values.device, self.values.dtype)
        return True

    def decode_add(self, y: torch.Tensor, v: torch.Tensor) -> None:
        """y += ΔW v in place, for one token at inference (y: out, v: in, in the update's dtype; decodes_into true):
        one matrix-vector product per part, each added straight into y."""
        scale = self.sparse_scale
        if self.values is not None and self.values.numel():
            lora = (self.lora_A, self.lora_B, self.scaling) if self.lora_A is not None else ()
            ops.decode_add(y, v, self.values, self.layout, scale, *lora)
        elif self.lora_A is not None:
            ops.decode_low_rank(y, v, self.lora_A, self.lora_B, self.scaling)
        if self.row_block is not None:
            ops.decode_rows(y, v, self.row_block, self.row_index, self.row_span, scale)
        if self.col_block is not None:
            ops.decode_columns(y, v, self.col_block, self.col_index, self.col_span, scale)

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """out += x ΔWᵀ in place for one token at inference (decoding), where decode_add applies. False, with out
        untouched, elsewhere (autograd on, several tokens, another dtype, a form decode_add does not take)."""
        dtype = self.reference.dtype
        if (torch.is_grad_enabled() or x.numel() != x.shape[-1] or out.dtype != dtype or x.dtype != dtype
                or not out.is_contiguous() or not self.decodes_into()):
            return False
        with ops._exact(x):
            self.decode_add(out.view(-1), x.reshape(-1))
        return True

    def add_to(self, weight: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """weight += sign · ΔW, in place, for a (out × in) weight (a transposed view is fine).

        Sparse parts are scattered, so no dense ΔW is built unless a low-rank part is present.
        Differentiable when called under autograd on a tensor that is not a leaf.
        """
        dtype = weight.dtype
        if self.values is not None:
            weight.index_put_(self.rows_cols(), (sign * self.effective_values()).to(dtype), accumulate=True)
        if self.row_block is not None:
            weight.index_add_(0, self.row_index.long(), (sign * self._scaled(self.row_block)).to(dtype))
        if self.col_block is not None:
            weight.index_add_(1, self.col_index.long(), (sign * self._scaled(self.col_block)).to(dtype))
        if self.lora_A is not None:
            weight.add_(((sign * self.scaling) * (self.lora_B @ self.lora_A)).to(dtype))
        return weight

    def dense(self, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        """ΔW as a dense (out × in) tensor; differentiable with respect to the trainable parts."""
        ref = self.reference
        weight = torch.zeros(
            self.out_features, self.in_features, dtype=dtype or ref.dtype, device=device or ref.device
        )
        return self.add_to(weight)

    def sparse_part(self) -> Optional["Delta"]:
        """This update without its low-rank part, or None if nothing else is left."""
        part = dataclasses.replace(self, lora_A=None, lora_B=None)
        return None if part.is_empty else part

    @torch.no_grad()
    def factor_grad_parts(self, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradient of ⟨G, ΔW⟩ with respect to each sparse part, by the part's name (VALUES, ROW_BLOCK,
        COL_BLOCK), for G = left · right given by its factors (left: out × q, right: q × in; a nuclear norm's
        U·Vᵀ); frozen slots get none. G is read at the support only, never formed: one dot product of length q
        per entry of sparse_entries(), in chunks of ≤ ops._BLOCK_ELEMENTS // q entries, split by entry_grad_parts.
        For penalties applied between backward and the optimizer step, so that no autograd graph runs through them."""
        rows, cols = ops.split_flat(self.sparse_entries()[0], self.in_features)
        right = right.t()
        grad = torch.empty(rows.numel(), dtype=left.dtype, device=left.device)
        step = max(1, ops._BLOCK_ELEMENTS // max(1, left.shape[1]))
        for a in range(0, rows.numel(), step):
            grad[a : a + step] = torch.linalg.vecdot(left[rows[a : a + step]], right[cols[a : a + step]])
        return self.entry_grad_parts(grad)

    @torch.no_grad()
    def entry_grad_parts(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradient of ⟨G, ΔW⟩ for each sparse part, by the part's name, from G already read at each of
        sparse_entries()'s positions, in its order: scaled as the parts are applied, frozen slots given none."""
        parts, at = {}, 0
        for name, tensor in ((VALUES, self.values), (ROW_BLOCK, self.row_block), (COL_BLOCK, self.col_block)):
            if tensor is None or not tensor.numel():
                continue
            part = grad[at : at + tensor.numel()].reshape(tensor.shape) * self.sparse_scale
            at += tensor.numel()
            if name == VALUES and self.frozen_slots is not None and self.frozen_slots.numel():
                part[self.frozen_slots.long()] = 0
            parts[name] = part
        return parts

    def sparse_matrix(self) -> torch.Tensor:
        """The sparse parts as one coalesced sparse COO (out × in) float32 tensor (repeats summed), for
        factorisations that only multiply by it (torch.svd_lowrank): nothing of out × in is formed."""
        positions, values = self.sparse_entries()
        rows, cols = ops.split_flat(positions, self.in_features)
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), values.float(), (self.out_features, self.in_features)).coalesce()

    def num_sparse(self) -> int:
        return sum(t.numel() for t in (self.values, self.row_block, self.col_block) if t is not None)

    def num_trainable(self) -> int:
        return self.num_sparse() + sum(t.numel() for t in (self.lora_A, self.lora_B) if t is not None)


def _add(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def check_stored(name: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> None:
    """Refuse a stored delta that does not fit a layer of this shape. Raises ValueError.

    `tensors` maps the names above (`sparse_values`, ...) to the tensors read from a file for one
    layer. Checks dtypes, shapes, that every index is in range, sorted and unique, and that every
    value is finite. Nothing here trusts the file.
    """

    def fail(msg: str):
        raise ValueError(f"{name}: {msg}")

    limits = {INDICES: out_features * in_features, ROW_INDEX: out_features, COL_INDEX: in_features}
    for key in INDEX_NAMES:
        if key not in tensors:
            continue
        idx = tensors[key]
        if idx.dtype not in (torch.int32, torch.int64):
            fail(f"{key} has dtype {idx.dtype}; indices must be int32 or int64")
        if idx.dim() != 1:
            fail(f"{key} has shape {tuple(idx.shape)}; indices must be 1-D")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limits[key]):
            fail(
                f"{key} holds indices outside [0, {limits[key]}) for a layer of shape "
                f"({out_features} × {in_features}); the adapter was saved for another base model or the file is corrupt"
            )
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            fail(f"{key} is not sorted and unique; the file is corrupt")
    if (FROZEN_SLOTS in tensors) != (FROZEN_VALUES in tensors) or (FROZEN_SLOTS in tensors and VALUES not in tensors):
        fail(f"{FROZEN_SLOTS} and {FROZEN_VALUES} must be stored together, with {VALUES}")
    if FROZEN_SLOTS in tensors:
        slots, n = tensors[FROZEN_SLOTS], tensors[VALUES].numel()
        if slots.dtype not in (torch.int32, torch.int64) or slots.dim() != 1:
            fail(f"{FROZEN_SLOTS} must be a 1-D int32 or int64 tensor")
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= n):
            fail(f"{FROZEN_SLOTS} holds slots outside [0, {n}); the file is corrupt")
        if slots.numel() > 1 and not bool((slots[1:] > slots[:-1]).all()):
            fail(f"{FROZEN_SLOTS} is not sorted and unique; the file is corrupt")
        if tuple(tensors[FROZEN_VALUES].shape) != (slots.numel(),):
            fail(f"{FROZEN_VALUES} has shape {tuple(tensors[FROZEN_VALUES].shape)}, not ({slots.numel()},)")
    for key in (*PARAMETER_NAMES, FROZEN_VALUES):
        if key in tensors and not tensors[key].dtype.is_floating_point:
            fail(f"{key} has dtype {tensors[key].dtype}; values must be floating point")
        if key in tensors and not bool(torch.isfinite(tensors[key]).all()):
            fail(f"{key} contains NaN or infinite values; the file is corrupt")
    for key, idx_key in INDEX_OF.items():
        if (key in tensors) != (idx_key in tensors):
            missing = idx_key if key in tensors else key
            fail(f"{missing} is missing; {key} and {idx_key} must be stored together")
    expected = {}
    if VALUES in tensors:
        expected[VALUES] = (tensors[INDICES].numel(),)
    if ROW_BLOCK in tensors:
        expected[ROW_BLOCK] = (tensors[ROW_INDEX].numel(), in_features)
    if COL_BLOCK in tensors:
        expected[COL_BLOCK] = (out_features, tensors[COL_INDEX].numel())
    if (LORA_A in tensors) != (LORA_B in tensors):
        fail(f"{LORA_A} and {LORA_B} must be stored together")
    if LORA_A in tensors:
        rank = tensors[LORA_A].shape[0] if tensors[LORA_A].dim() == 2 else -1
        expected[LORA_A] = (rank, in_features)
        expected[LORA_B] = (out_features, rank)
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            fail(
                f"{key} has shape {tuple(tensors[key].shape)} but a layer of shape ({out_features} × {in_features}) "
                f"needs {shape}; the adapter was saved for another base model or the file is corrupt"
            )
