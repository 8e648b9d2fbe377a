"""SM3 for sparse deltas: the optimizer of SpIEL's momentum-regrowth (MA) variant.

SM3 (Anil et al., 2019) keeps one accumulator per row and one per column of each weight where
Adam keeps two per trainable entry: for a delta of k entries on an out × in weight that is
4·(out + in) bytes instead of 8·k. Each step, for an active entry j at (r, c) with gradient g:

    u_j = min(row[r], col[c]) + g_j²        row[r] = max(row[r], u_j over its entries)
    p_j -= lr · g_j / sqrt(u_j + eps)       col[c] = max(col[c], u_j over its entries)

(Adagrad-style sums, no momentum, decoupled weight decay). The same row and column accumulators
are what momentum regrowth scores new positions by, so `SparseScheduler` reads them from here
instead of keeping its own when this optimizer trains the adapter.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from ._util import find_peft_model


def sm3_accumulate(row: torch.Tensor, col: torch.Tensor, indices: torch.Tensor, in_features: int, grad: torch.Tensor):
    """One SM3 step of the row and column accumulators, in place, for the entries at flat `indices`.

    Returns u, each entry's second-moment estimate: min(row[r], col[c]) + g².
    """
    rows, cols = ops.split_flat(indices, in_features)
    u = torch.minimum(row[rows], col[cols]) + grad.float() ** 2
    row.scatter_reduce_(0, rows, u, "amax")
    col.scatter_reduce_(0, cols, u, "amax")
    return u


class SparseSM3(torch.optim.Optimizer):
    """SM3 over the unstructured sparse values of one adapter.

    Args:
        model: the PEFT model; the optimizer takes every `sparse_values` tensor of the adapter.
        lr, eps, weight_decay: as usual; weight decay is decoupled (p -= lr · wd · p).
        adapter_name: defaults to the model's active adapter.
    """

    def __init__(self, model, lr: float = 1e-3, eps: float = 1e-30, weight_decay: float = 0.0, adapter_name: Optional[str] = None):
        model, layers = find_peft_model(model)
        adapter = adapter_name or model.active_adapter
        self.layer_of = {}
        for layer in layers.values():
            if adapter in layer.sparse_values:
                self.layer_of[layer.sparse_values[adapter]] = (layer, adapter)
        if not self.layer_of:
            raise ValueError(
                f"adapter {adapter!r} has no unstructured sparse values for SparseSM3 to train: SparseSM3 is for "
                "structure='unstructured' adapters; use torch.optim.AdamW for the others"
            )
        super().__init__(list(self.layer_of), dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def accumulators(self, values: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        state = self.state.get(values)
        return (state["row"], state["col"]) if state else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer, adapter = self.layer_of[p]
                out_features, in_features = layer.delta_shape
                state = self.state[p]
                if not state:
                    state["row"] = torch.zeros(out_features, device=p.device)
                    state["col"] = torch.zeros(in_features, device=p.device)
                g = p.grad.float()
                u = sm3_accumulate(state["row"], state["col"], layer.sparse_indices[adapter], in_features, g)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((g / (u + group["eps"]).sqrt()).to(p.dtype), alpha=-group["lr"])
        return loss
