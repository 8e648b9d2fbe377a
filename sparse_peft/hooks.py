"""Per-step work besides regrowth, run by `SparseScheduler` around each optimizer step.

- `NuclearNorm` (SaRA): λ·‖ΔW‖_* on the sparse update. Its subgradient U·Vᵀ comes from an SVD under
  `no_grad` and is added straight into the trainable tensors' `.grad` before the optimizer step, so
  no autograd graph runs through the SVD and any optimizer, clipping or accumulation sees it.
  (SaRA's own memory-saving path sends this gradient to tensors the optimizer never reads.)
- `Progressive` (SaRA): once, at a chosen step, the entries whose |w + Δ| has risen above the
  threshold stop training; their learned values move to frozen buffers of the layer.
- `Perturbation` (LoRA-GGPO): before each optimizer step, the row-wise noise scale of the next
  steps' forwards, from the weight norms and this step's gradients (paper Eq. 6-8).

Each hook takes the scheduler's (layer name -> layer) map and adapter name, and returns its
statistics for the trainer's logs. A hook has `before_optimizer_step(t)` (gradients are complete
and clipped) and/or `after_optimizer_step(t)`, t counting optimizer steps from 1. Hooks keep no
state of their own that t cannot give back, so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional

import torch

from .delta import Delta


def _sparse_part(layer, adapter: str) -> Optional[Delta]:
    """The adapter's update on a layer without its low-rank part (what SaRA's penalty looks at)."""
    delta = layer.get_delta(adapter)
    if delta is None:
        return None
    delta.lora_A = delta.lora_B = None
    return None if delta.is_empty else delta


class NuclearNorm:
    def __init__(self, layers: dict, adapter: str, weight: float, per_step: int, rank: Optional[int]):
        self.layers = {n: m for n, m in layers.items() if _sparse_part(m, adapter) is not None}
        self.adapter, self.weight, self.per_step, self.rank = adapter, weight, per_step, rank

    @torch.no_grad()
    def before_optimizer_step(self, t: int) -> dict:
        names = list(self.layers)
        if not names:
            return {}
        # layers take turns, so every one is penalised equally often
        per_step = min(self.per_step, len(names))
        chosen = [names[((t - 1) * per_step + i) % len(names)] for i in range(per_step)]
        total = 0.0
        for name in chosen:
            delta = _sparse_part(self.layers[name], self.adapter)
            norm, subgradient = nuclear_subgradient(delta.dense(torch.float32), self.rank)
            total += norm
            _add_into_grads(delta, self.weight * subgradient)
        return {"sparse/nuclear_norm": total}


def nuclear_subgradient(matrix: torch.Tensor, rank: Optional[int] = None) -> tuple[float, torch.Tensor]:
    """‖M‖_* and a subgradient U·Vᵀ over the non-zero singular values (Watson 1992).

    Directions of zero singular values are left out: at M = 0 the subgradient is 0, not a random
    U·Vᵀ that would push an untrained update somewhere arbitrary. With `rank`, a randomized SVD of that
    rank approximates both (cheap on large layers; the norm is then a lower bound).
    """
    if rank is not None and rank < min(matrix.shape):
        u, s, v = torch.svd_lowrank(matrix, q=rank, niter=2)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s > s.max() * 1e-6 if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return float(s.sum()), (u[:, keep] @ vh[keep]) if bool(keep.any()) else torch.zeros_like(matrix)


def _add_into_grads(delta: Delta, dense_grad: torch.Tensor) -> None:
    """Add the gradient of a function of the dense ΔW to the trainable tensors it is made of."""
    g = dense_grad * delta.sparse_scale
    if delta.values is not None and delta.values.numel():
        rows, cols = delta.rows_cols()
        part = g[rows, cols]
        if delta.frozen_slots is not None and delta.frozen_slots.numel():
            part[delta.frozen_slots.long()] = 0  # frozen entries do not train
        _accumulate(delta.values, part)
    if delta.row_block is not None:
        _accumulate(delta.row_block, g[delta.row_index.long()])
    if delta.col_block is not None:
        _accumulate(delta.col_block, g[:, delta.col_index.long()])


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


class Progressive:
    def __init__(self, layers: dict, adapter: str, at_step: int, threshold: Optional[float], optimizer=None):
        self.layers = {n: m for n, m in layers.items() if adapter in m.sparse_values}
        self.adapter, self.at_step, self.threshold, self.optimizer = adapter, at_step, threshold, optimizer

    @torch.no_grad()
    def after_optimizer_step(self, t: int) -> dict:
        if t != self.at_step:
            return {}
        kept = total = 0
        for layer in self.layers.values():
            k, n = freeze_above_threshold(layer, self.adapter, self.threshold, self.optimizer)
            kept, total = kept + k, total + n
        if total and kept < 0.05 * total:
            # faithful to the rule, but the rest of the run then trains almost nothing: say why
            warnings.warn(
                f"SaRA's progressive step at step {t} kept only {kept} of {total} entries training: the updates "
                "have moved the others above the magnitude threshold, which is tiny for the smallest weights. The "
                "paper ties the learning rate to the threshold (lr = 1e-3·exp(-350·θ)); lower the learning rate, set "
                "a larger `threshold`, or progressive_step=None to keep every entry training.",
                stacklevel=2,
            )
        return {"sparse/progressive_kept": kept / max(total, 1), "sparse/trainable_after_progressive": kept}


@torch.no_grad()
def freeze_above_threshold(layer, adapter: str, threshold: Optional[float], optimizer=None) -> tuple[int, int]:
    """Stop training every entry whose |w + Δ| is no longer below the threshold (SaRA §4.3).

    Without an absolute threshold (a per-layer fraction chose the support), the layer's own is
    implied: the largest |w| the selection took. Frozen entries keep their learned values in the
    layer's frozen buffers; their trainable slots and optimizer state are zeroed, so with a zero
    gradient every usual optimizer leaves them at zero. Returns (entries still training, all entries).
    """
    from .schedule import _unwrap_optimizer

    values, indices = layer.sparse_values[adapter], layer.sparse_indices[adapter]
    if values.numel() == 0:
        return 0, 0
    delta = layer.get_delta(adapter)
    rows, cols = delta.rows_cols()
    w0 = layer._base_weight_2d()[rows.to(values.device), cols.to(values.device)].float()
    limit = threshold if threshold is not None else float(w0.abs().max())
    current = delta.effective_values().float()
    frozen = (w0 + current).abs() >= limit
    if adapter in layer.sparse_frozen_slots:
        frozen[layer.sparse_frozen_slots[adapter].long()] = True
    slots = frozen.nonzero().squeeze(1)
    # stored unscaled: effective_values applies the scale after the frozen ones are put in
    layer.sparse_frozen_values[adapter] = delta.effective_values(scaled=False)[slots].detach().clone()
    layer.sparse_frozen_slots[adapter] = slots.to(indices.dtype)
    values[slots] = 0
    optimizer = _unwrap_optimizer(optimizer)
    state = optimizer.state.get(values) if optimizer is not None else None
    for tensor in (state or {}).values():
        if torch.is_tensor(tensor) and tensor.shape == values.shape:
            tensor[slots] = 0
    return values.numel() - slots.numel(), values.numel()


class Perturbation:
    def __init__(self, layers: dict, adapter: str, sigma: float, beta: float, seed: int):
        from . import perturbation

        self.layers = {n: m for n, m in layers.items() if adapter in m.sparse_lora_A}
        self.adapter, self.sigma, self.beta, self.seed = adapter, sigma, beta, seed
        self.w0_row_sq = {}
        for name, layer in self.layers.items():
            layer.check_perturbable()
            self.w0_row_sq[name] = perturbation.row_sq_norms(layer._base_weight_2d())
        self._refresh(1, with_grads=False)

    @torch.no_grad()
    def _refresh(self, t: int, with_grads: bool) -> float:
        """The noise of optimizer step t: its scale, and a seed of its own."""
        from .perturbation import ggpo_row_std

        mean_std = 0.0
        for i, (name, layer) in enumerate(self.layers.items()):
            a, b = layer.sparse_lora_A[self.adapter], layer.sparse_lora_B[self.adapter]
            std = ggpo_row_std(
                self.w0_row_sq[name].to(a.device), a, b, a.grad if with_grads else None, b.grad if with_grads else None,
                layer.sparse_scaling[self.adapter], self.sigma, self.beta,
            )
            # a fresh noise seed per step and layer; fixed within the step, so gradient checkpointing's
            # recomputed forward and the backward redraw exactly the same noise
            seed = zlib.crc32(f"{self.seed}/{t}/{name}".encode())
            layer.sparse_noise[self.adapter] = (std, seed)
            mean_std += float(std.mean())
        return mean_std / max(len(self.layers), 1)

    def before_optimizer_step(self, t: int) -> dict:
        # the gradients of step t set the noise of step t + 1's forwards
        return {"sparse/perturbation_std": self._refresh(t + 1, with_grads=True)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        # the scale of the next step's noise depends on the last step's gradients, which a checkpoint
        # does not hold: keep the scale itself (out floats per layer); the seed follows from the step
        return {f"noise.{name}": layer.sparse_noise[self.adapter][0] for name, layer in self.layers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], t: int) -> None:
        """Resume after t optimizer steps: the noise of step t + 1, as the interrupted run had it."""
        self._refresh(t + 1, with_grads=False)  # the seeds, and a scale for layers the state lacks
        for name, layer in self.layers.items():
            std = state.get(f"noise.{name}")
            if std is not None:
                layer.sparse_noise[self.adapter] = (std.to(layer.sparse_lora_A[self.adapter].device), layer.sparse_noise[self.adapter][1])

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.sparse_noise.pop(self.adapter, None)


__all__ = ["NuclearNorm", "Perturbation", "Progressive", "freeze_above_threshold", "nuclear_subgradient"]
