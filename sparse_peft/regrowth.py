"""The general pieces of drop-and-regrow: which slots to drop, where to grow, the gradient statistics
behind it, and the optimizer state that follows the indices. A method's per-step work (SpIEL's
regrowth, RoSA's one-shot mask) is built from these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import ops
from ._util import unwrap_optimizer
from .full import read_state, state_keys, write_state_


def drop_fraction(step: int, total: int, initial_rate: float, policy: str) -> float:
    progress = min(step / total, 1.0)
    if policy == "linear":
        return initial_rate * (1.0 - progress)
    return initial_rate * (1.0 + math.cos(math.pi * progress)) / 2.0


def top_positions(
    block_scores: Callable[[int, int], torch.Tensor],
    out_features: int,
    in_features: int,
    n: int,
    exclude: Optional[torch.Tensor] = None,
    nonnegative: bool = False,
    int32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n flat positions of an (out × in) score matrix with the largest |score|, and their scores.

    The matrix is never whole: `block_scores(r0, r1)` gives rows r0:r1, and a running top-n is
    kept across blocks. Positions in `exclude` (sorted flat indices) never qualify. `nonnegative`:
    the scores are ≥ 0 (sums of squares), so |score| is the score itself and no copy of it is made.
    Returns positions sorted ascending (int64; with `int32`, int32 where they fit), with their signed scores.
    The running top-n holds its positions in int32 where they fit: it is the larger part of what a merge forms
    (RoSA's warm-up steps).
    """
    step = max(1, (ops._BLOCK_ELEMENTS // 4) // in_features)  # a block, its |·| and its scores' temporaries: ≤ 1 MiB together
    position = torch.int32 if out_features * in_features <= torch.iinfo(torch.int32).max else torch.long
    best_pos = torch.empty(0, dtype=position)
    best_val = torch.empty(0)
    floor = -math.inf  # once n are kept, the smallest |score| among them: a block's entries at or below it cannot enter
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        block = block_scores(r0, r1).reshape(-1).float()
        key = block if nonnegative else block.abs()
        if exclude is not None and exclude.numel():
            lo, hi = torch.searchsorted(exclude.long(), torch.tensor([r0 * in_features, r1 * in_features])).tolist()
            key[exclude[lo:hi].long() - r0 * in_features] = -math.inf
        if floor > -math.inf:
            # only the entries that beat the kept ones join the merge: it stays O(n + entering), not O(n + block)
            top = (key > floor).nonzero().squeeze(1)
            if top.numel() > n:
                top = top[torch.topk(key[top], n).indices]
        else:
            top = torch.topk(key, min(n, key.numel())).indices
            top = top[key[top] > -math.inf]
        best_pos = torch.cat([best_pos.to(top.device), (top + r0 * in_features).to(position)])
        best_val = torch.cat([best_val.to(block.device), block[top]])
        del block, key, top  # not alive through the merge
        if best_pos.numel() > n:
            top = torch.topk(best_val if nonnegative else best_val.abs(), n).indices
            best_pos, best_val = best_pos[top], best_val[top]
            del top
        if best_pos.numel() == n and n:
            floor = float(best_val.min() if nonnegative else best_val.abs().min())
    order = best_pos.argsort()
    return (best_pos[order] if int32 else best_pos[order].long()), best_val[order]


@dataclass
class Regrowth:
    indices: torch.Tensor  # the new support, sorted, int64
    source: torch.Tensor  # for each new slot, the old slot whose value and state it keeps, or -1
    dropped: int  # old positions no longer in the support (equal to the new ones grown)


def regrow(indices: torch.Tensor, values: torch.Tensor, n_drop: int, candidates: torch.Tensor, scores: torch.Tensor) -> Regrowth:
    """Drop the n_drop slots of smallest |value|; grow the best-scoring candidates not kept.

    A dropped position that is chosen again keeps its value and optimizer state. If fewer than
    n_drop candidates qualify, the dropped slots of largest |value| stay, so the size of the
    support never changes.
    """
    k = indices.numel()
    positions = indices.long()
    order = torch.argsort(values.detach().abs(), stable=True)  # smallest |value| first
    outgoing, kept = order[:n_drop], order[n_drop:]
    eligible = ~torch.isin(candidates, positions[kept])
    candidates, scores = candidates[eligible], scores[eligible]
    take = min(n_drop, candidates.numel())
    chosen = candidates[torch.topk(scores, take).indices] if take else candidates[:0]
    if take < n_drop:
        refill = outgoing.flip(0)  # largest |value| first
        refill = refill[~torch.isin(positions[refill], chosen)][: n_drop - take]
        kept = torch.cat([kept, refill])
    new = torch.cat([positions[kept], chosen]).sort().values
    slot = torch.searchsorted(positions, new).clamp_(max=k - 1)
    source = torch.where(positions[slot] == new, slot, torch.full_like(slot, -1))
    return Regrowth(new, source, int((source < 0).sum()))


class GradientProbe:
    """The weight gradient of one layer at candidate positions, summed over an accumulation window.

    Called from `ops.SparseLinear`'s backward with (dy, x). The first call builds the dense
    gradient one block of rows at a time and keeps the n positions of largest |g| as the
    candidates; later calls add the gradient at those candidates only. Memory: O(n).
    """

    def __init__(self, n_candidates: int):
        self.n = n_candidates
        self.candidates: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None
        self._layout: Optional[ops.Layout] = None  # the candidates' CSR pattern, for the sampled gradient

    def __call__(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        if self.candidates is None:
            out_features, in_features = dy.shape[1], x.shape[1]
            x32, dy32 = x.float(), dy.float()
            self.candidates, self.sums = top_positions(
                lambda r0, r1: dy32[:, r0:r1].t() @ x32, out_features, in_features, self.n
            )
        else:
            if self._layout is None or not self._layout.fits(self.candidates, x.shape[1]):
                self._layout = ops.Layout(self.candidates, x.shape[1])
            self.sums += ops.grad_at(dy, x, self.candidates, torch.float32, self._layout)


def gather_candidates(candidates: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool every rank's candidates and sums, so that every rank computes the same selection."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return candidates, sums
    world = dist.get_world_size()
    size = torch.tensor([candidates.numel()], device=sums.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    # all_gather needs one length: pad with position -1, dropped again below
    pos = torch.full((longest,), -1, dtype=torch.long, device=sums.device)
    val = torch.zeros(longest, dtype=torch.float32, device=sums.device)
    pos[: candidates.numel()], val[: sums.numel()] = candidates, sums
    all_pos = [torch.empty_like(pos) for _ in range(world)]
    all_val = [torch.empty_like(val) for _ in range(world)]
    dist.all_gather(all_pos, pos)
    dist.all_gather(all_val, val)
    pos, val = torch.cat(all_pos), torch.cat(all_val)
    real = pos >= 0
    unique, inverse = torch.unique(pos[real], return_inverse=True)
    return unique, torch.zeros(unique.numel(), device=val.device).index_add_(0, inverse, val[real])


def remap_optimizer_state(optimizer, param: torch.Tensor, source: torch.Tensor) -> None:
    """Move per-element optimizer state with the slots it belongs to.

    New slots start with zero state, except Adam's second moment (`exp_avg_sq`, `max_exp_avg_sq`):
    it takes the mean over the kept slots. The step count is shared by the whole tensor, so Adam's
    bias correction has long faded; with a zero second moment a new entry's first updates would be
    ~3x the usual size (lr·(1-β1)/sqrt(1-β2)), with a typical one they are of typical size.
    """
    optimizer = unwrap_optimizer(optimizer)
    keep = source >= 0
    for key in state_keys(optimizer, param):
        whole = read_state(optimizer, param, key)  # whole, however the engine shards or partitions it
        moved = torch.zeros_like(whole)
        moved[keep] = whole[source[keep]]
        if "exp_avg_sq" in key and bool(keep.any()):
            moved[~keep] = whole[source[keep]].mean()
        write_state_(optimizer, param, key, moved)


class SquaredGradientPool:
    """Σ g² of one layer's weight gradient over a window, kept for a pool of n positions (a streaming top-n).

    Called from `ops.SparseLinear`'s backward with (dy, x). Each call streams the dense gradient
    g = dyᵀx one block of rows at a time (never the whole out × in at once), adds g² to the sums the
    pool carries, and keeps the n positions of largest running sum: a position enters whenever its
    accumulated statistic beats the pool's weakest, and one that leaves forgets its history. So the
    kept set approximates the top-n of the exact Σ g² (its recall is measured in tests/methods/test_rosa.py).
    Memory: the pool (n positions and sums) plus one block. Costs a dense gradient per backward.
    """

    def __init__(self, n: int):
        self.n = n
        self.candidates: Optional[torch.Tensor] = None
        self.sums: Optional[torch.Tensor] = None

    def __call__(self, dy: torch.Tensor, x: torch.Tensor) -> None:
        out_features, in_features = dy.shape[1], x.shape[1]
        x32, dy32 = x.float(), dy.float()
        pool, sums = self.candidates, self.sums

        def block(r0: int, r1: int) -> torch.Tensor:
            g = (dy32[:, r0:r1].t() @ x32).square_()
            if pool is not None:
                bounds = torch.tensor([r0 * in_features, r1 * in_features], dtype=pool.dtype, device=pool.device)
                lo, hi = torch.searchsorted(pool, bounds).tolist()
                g.view(-1).index_add_(0, pool[lo:hi] - r0 * in_features, sums[lo:hi].to(g.device))
            return g

        # int32 positions where they fit: the pool is kept from step to step, 8 bytes per candidate rather than 12
        candidates, sums = top_positions(block, out_features, in_features, self.n, nonnegative=True, int32=True)
        if pool is not None and pool.shape == candidates.shape:
            # into the pool's own storage: it is state carried from step to step (as an optimizer's is), kept in
            # place rather than reallocated every backward
            pool.copy_(candidates)
            self.sums.copy_(sums)
        else:
            self.candidates, self.sums = candidates, sums


def attach_probes(layers: dict, adapter: str, make: Callable) -> list:
    """Give every layer a fresh probe `make(layer)` for this adapter (its backward then feeds it); returns
    them, so that only these are taken off again (`detach_probes`)."""
    probes = []
    for layer in layers.values():
        layer.sparse_probe[adapter] = probe = make(layer)
        probes.append(probe)
    return probes


def detach_probes(layers: dict, adapter: str, probes: list) -> None:
    """Take off those of `probes` still attached; a scheduler that took over may have attached its own."""
    for layer in layers.values():
        if any(layer.sparse_probe.get(adapter) is probe for probe in probes):
            layer.sparse_probe.pop(adapter)
