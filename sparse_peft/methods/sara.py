"""SaRA (Hu et al., ICLR 2025): re-train the smallest-magnitude weights.

A per-layer fraction of the smallest |w| by default (set `threshold` for the paper's absolute one),
a nuclear-norm penalty on the update (λ = 5e-4, the README's), and at half of the run the
progressive step: only entries still below the threshold keep training.

Default targets ("all-layers"): every linear and Conv2d layer except the output head. The paper's
code masks every parameter of the U-Net (convolutions included); sparse_peft adapts layers, so the
closest default is all the layers it can wrap. Norms, biases and embeddings stay frozen.

Per-step work:
- `NuclearNorm`: λ·‖ΔW‖_* on the sparse update. Its subgradient U·Vᵀ, read at the support only, comes
  from the eigendecomposition of ΔW's smaller Gram matrix on large layers (about 1.5 fp32 weights of
  scratch on a 2752 × 1024 layer, where a full SVD of the dense ΔW needed 3.4) and from the exact SVD
  on small ones, under `no_grad`, and is added straight into the trainable tensors' `.grad` before the
  optimizer step, so no autograd graph runs through it and any optimizer, clipping or accumulation sees it.
  (SaRA's own memory-saving path sends this gradient to tensors the optimizer never reads.)
- `Progressive`: once, at a chosen step, the entries whose |w + Δ| has risen above the threshold
  stop training; their learned values move to frozen buffers of the layer.
Both are pure functions of the step number, so a resumed run repeats the same penalised layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .. import ops
from ..full import add_grad_
from ..selection import below_threshold
from ._base import Method, Run


@dataclass
class SaraKnobs:
    threshold: Optional[float] = field(default=None, metadata={
        "help": "Train every entry whose |w| is below this absolute value (the paper uses 2e-3), instead of a "
        "fraction of each layer; `density` is then not used and each layer's count follows its weights. Needs "
        "selection='small_magnitude' and structure='unstructured'."})
    nuclear_norm_weight: float = field(default=5e-4, metadata={
        "help": "Weight λ of a nuclear-norm penalty λ·||ΔW||_* on each layer's sparse update, applied as a "
        "subgradient added to the values' gradients before each optimizer step. 0 disables it."})
    nuclear_norm_layers: int = field(default=1, metadata={
        "help": "How many layers get the nuclear-norm subgradient per optimizer step, in turn (each SVD costs time)."})
    nuclear_norm_rank: Optional[int] = field(default=None, metadata={
        "help": "Use a randomized SVD of this rank for the subgradient instead of every singular value (cheaper "
        "on large layers; the norm is then a lower bound). None: every singular value (from the Gram matrix's "
        "eigendecomposition on layers over 2^18 entries, the exact SVD below)."})
    progressive_step: Optional[Union[int, float]] = field(default=0.5, metadata={
        "help": "At this optimizer step (an integer), or at this fraction of the run (a float below 1), keep "
        "training only the entries whose |w + Δ| is still below the threshold and freeze the others at their "
        "learned values. 0: never."})


class Sara(Method):
    title = "SaRA: re-training the ineffective parameters"
    paper = "https://arxiv.org/abs/2409.06633"
    defaults = dict(structure="unstructured", selection="small_magnitude", density=0.01, r=0)
    Knobs = SaraKnobs
    default_targets = "all-layers"

    def check(self, config) -> None:
        k = config.knobs
        if k.threshold is not None:
            if not (isinstance(k.threshold, (int, float)) and k.threshold > 0):
                raise ValueError(f"threshold={k.threshold!r} must be > 0, e.g. 2e-3 as in SaRA")
            if config.selection != "small_magnitude" or config.structure != "unstructured":
                raise ValueError("threshold chooses the entries with |w| below it: use selection='small_magnitude' "
                                 "and structure='unstructured' with it")
        if not (isinstance(k.nuclear_norm_weight, (int, float)) and k.nuclear_norm_weight >= 0):
            raise ValueError(f"nuclear_norm_weight={k.nuclear_norm_weight!r} must be >= 0 (0 disables it)")
        if not isinstance(k.nuclear_norm_layers, int) or k.nuclear_norm_layers < 1:
            raise ValueError(f"nuclear_norm_layers={k.nuclear_norm_layers!r} must be an integer >= 1")
        if k.nuclear_norm_rank is not None and (not isinstance(k.nuclear_norm_rank, int) or k.nuclear_norm_rank < 1):
            raise ValueError(f"nuclear_norm_rank={k.nuclear_norm_rank!r} must be a positive integer or None (full SVD)")
        if not k.nuclear_norm_weight and "nuclear_norm_layers" in config.given:
            raise ValueError(f"nuclear_norm_layers={k.nuclear_norm_layers!r} has no effect with nuclear_norm_weight=0 "
                             "(no penalty): set nuclear_norm_weight > 0; remove it or enable what it tunes")
        if k.nuclear_norm_weight and config.structure == "none":
            raise ValueError("nuclear_norm_weight penalises the sparse part, and structure='none' has none: set "
                             "nuclear_norm_weight=0, or a structure with a sparse part")
        step = k.progressive_step
        if step:  # 0 or None: never
            if (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0
                    or (isinstance(step, float) and step >= 1 and not step.is_integer())):
                raise ValueError(f"progressive_step={step!r} must be a step number >= 1 or a fraction of the run in (0, 1)")
            if config.selection != "small_magnitude" or config.structure != "unstructured":
                raise ValueError("progressive_step keeps training the entries still below the magnitude threshold: it "
                                 "needs selection='small_magnitude' and structure='unstructured'")

    def has_steps(self, config) -> bool:
        return bool(config.knobs.nuclear_norm_weight) or bool(config.knobs.progressive_step)

    def run_length_needed(self, config) -> str:
        at = config.knobs.progressive_step
        if isinstance(at, float) and at < 1:
            return (f"progressive_step={at} as a fraction of the run needs the run's total number of optimizer steps "
                    "(or give progressive_step as a step number)")
        return ""

    def steps(self, run: Run) -> list:
        k, work = run.config.knobs, []
        if k.nuclear_norm_weight:
            work.append(NuclearNorm(run, k.nuclear_norm_weight, k.nuclear_norm_layers, k.nuclear_norm_rank))
        if k.progressive_step and not (self.run_length_needed(run.config) and not run.total):
            at = k.progressive_step
            if isinstance(at, float) and at < 1:
                at = max(1, round(at * run.total))
            work.append(Progressive(run, int(at), k.threshold))
        return work

    def choose_support(self, layer, config, module_key, k, exclude) -> Optional[torch.Tensor]:
        if config.knobs.threshold is None:
            return None
        # every entry below an absolute threshold, however many that is on this layer
        support = below_threshold(layer._base_weight_2d(), config.knobs.threshold)
        return support if exclude is None else support[~torch.isin(support, exclude.to(support.device))]

    def card_lines(self, config) -> list[str]:
        k, lines = config.knobs, []
        if k.threshold is not None:
            lines.append(f"entries with |w| < {k.threshold:g}")
        if k.nuclear_norm_weight:
            lines.append(f"nuclear-norm penalty λ={k.nuclear_norm_weight:g}")
        if k.progressive_step:
            lines.append(f"progressive step at {k.progressive_step:g}")
        return lines


def nuclear_factors(delta, rank: Optional[int] = None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """‖ΔW‖_* of a Delta's sparse parts and a subgradient U·Vᵀ over the non-zero singular values (Watson 1992),
    as its factors (U: out × q, Vᵀ: q × in), never multiplied out.

    Directions of zero singular values are left out: at ΔW = 0 the subgradient is 0, not a random
    U·Vᵀ that would push an untrained update somewhere arbitrary. With `rank`, a randomized SVD of that
    rank on the sparse matrix itself approximates both (the norm is then a lower bound) and nothing of
    out × in is formed; without, the full SVD of a dense fp32 ΔW (that copy and LAPACK's U, Vᵀ and
    workspace: about 3.4x the layer's fp32 weight at 2752 × 1024, formed once per penalised layer; the rank-8
    one 0.26x; `python benchmarks/csr_timings.py`).
    """
    shape = (delta.out_features, delta.in_features)
    if rank is not None and rank < min(shape):
        u, s, v = torch.svd_lowrank(delta.sparse_matrix(), q=rank, niter=2)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(delta.dense(torch.float32), full_matrices=False)
    keep = s > s.max() * 1e-6 if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return float(s.sum()), u[:, keep], vh[keep]


def _by_svd(delta, rank: Optional[int] = None) -> tuple[float, dict[str, torch.Tensor]]:
    """nuclear_subgradient through nuclear_factors (the full SVD, or the randomized one of `rank`)."""
    norm, u, vh = nuclear_factors(delta, rank)
    return norm, delta.factor_grad_parts(u, vh)


# directions of ΔW whose singular value is below this fraction of the largest are left out of the Gram path's
# subgradient: the Gram matrix squares the singular values, so in fp32 weaker ones are not resolved
GRAM_RESOLVES = 1e-4


def nuclear_subgradient(delta, rank: Optional[int] = None,
                        gram_above: int = ops._BLOCK_ELEMENTS) -> tuple[float, dict[str, torch.Tensor]]:
    """‖ΔW‖_* of a Delta's sparse parts and a subgradient U·Vᵀ read at each part's support (factor_grad_parts's
    dict), with nothing of out × in formed.

    With `rank`: nuclear_factors's randomized SVD. Without: every singular value, from the eigendecomposition of
    the smaller Gram matrix of ΔW's non-empty rows and columns. With B that part of ΔW, oriented tall (m its
    narrow side), BᵀB = V Σ² Vᵀ and U·Vᵀ = B · (V Σ⁻¹ Vᵀ): the m × m Gram, eigh's eigenvectors and workspace are
    the largest tensors (about four of m × m at once), and B is read in ≤ 1 MiB blocks of rows. A full SVD of the
    dense ΔW costs about 3.4 fp32 weights on a 2752 × 1024 layer, this 1.5 (`python benchmarks/csr_timings.py
    kernels`). fp32 resolves directions down to GRAM_RESOLVES · σ_max this way; weaker ones are left out, as
    are exact zeros (at ΔW = 0 the subgradient is 0), and the weak ones it keeps are noisier than the SVD's.
    So layers of at most `gram_above` entries (one ≤ 1 MiB block by default), where the SVD's scratch is a few
    MiB, take the exact full SVD. Should eigh not converge (many repeated eigenvalues), the full SVD runs
    instead, with a warning.
    """
    if (rank is not None and rank < min(delta.out_features, delta.in_features)) or (
            delta.out_features * delta.in_features <= gram_above):
        return _by_svd(delta, rank)
    positions, values = delta.sparse_entries()  # as applied (scaled); a position may repeat across parts
    rows, cols = ops.split_flat(positions, delta.in_features)
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    live = values != 0
    rows_used, cols_used = rows[live].unique(), cols[live].unique()
    if rows_used.numel() < cols_used.numel():  # wide: work on ΔWᵀ, whose Gram is the smaller one
        rows, cols, rows_used, cols_used = cols, rows, cols_used, rows_used
    n, m = rows_used.numel(), cols_used.numel()
    grad = values.new_zeros(values.shape)
    if m == 0:
        return 0.0, delta.entry_grad_parts(grad)
    # each entry's row and column in B; entries outside B (zero-valued in an empty row or column) read 0
    bi = torch.searchsorted(rows_used, rows).clamp_(max=n - 1)
    bj = torch.searchsorted(cols_used, cols).clamp_(max=m - 1)
    inside = (rows_used[bi] == rows) & (cols_used[bj] == cols)
    del positions, rows, cols, rows_used, cols_used, live  # only B's coordinates from here on
    order = torch.argsort(bi.masked_fill(~inside, n), stable=True)
    bi, bj, values = bi[order], bj[order], values[order]
    step = max(1, ops._BLOCK_ELEMENTS // m)
    starts = torch.searchsorted(bi, torch.arange(0, n + step, step, device=bi.device)).tolist()

    def blocks():
        """(entries' slice, B's rows r0:r0+step as a dense block), ≤ 1 MiB each."""
        for b, r0 in enumerate(range(0, n, step)):
            a, z = starts[b], starts[b + 1]
            block = values.new_zeros(min(step, n - r0), m)
            block.index_put_((bi[a:z] - r0, bj[a:z]), values[a:z], accumulate=True)
            yield slice(a, z), r0, block

    gram = values.new_zeros(m, m)
    for _, _, block in blocks():
        gram.addmm_(block.t(), block)
    del block  # not alive through eigh
    try:
        eigenvalues, v = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        eigenvalues = None
    del gram  # not alive through the SVD nor the second pass
    if eigenvalues is None:
        warnings.warn(f"SaRA's nuclear norm: eigh did not converge on a {delta.out_features} x {delta.in_features} "
                      "update (many repeated singular values); this step used the full SVD of the dense update "
                      "instead (about 3.4x the layer's fp32 weight). nuclear_norm_rank avoids both.", stacklevel=3)
        return _by_svd(delta)
    sigma = eigenvalues.clamp_(min=0).sqrt_()
    keep = sigma > sigma.max() * GRAM_RESOLVES  # at ΔW = 0 nothing: the subgradient is 0
    v = v[:, keep]
    factor = (v / sigma[keep]) @ v.t()  # V Σ⁻¹ Vᵀ, m × m
    del v
    for entries, r0, block in blocks():
        grad[order[entries]] = (block @ factor)[bi[entries] - r0, bj[entries]]
    grad[~inside] = 0
    return float(sigma[keep].sum()), delta.entry_grad_parts(grad)


class NuclearNorm:
    def __init__(self, run: Run, weight: float, per_step: int, rank: Optional[int]):
        self.run, self.weight, self.per_step, self.rank = run, weight, per_step, rank
        self.layers = {n: m for n, m in run.layers.items() if self._part(m) is not None}

    def _part(self, layer):
        delta = layer.get_delta(self.run.adapter, whole=True)
        return None if delta is None else delta.sparse_part()

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
            delta = self._part(self.layers[name])
            norm, parts = nuclear_subgradient(delta, self.rank)
            total += norm
            layer = self.layers[name]
            for part, grad in parts.items():
                add_grad_(getattr(layer, part)[self.run.adapter], self.weight * grad)
        return {"sparse/nuclear_norm": total}


class Progressive:
    def __init__(self, run: Run, at_step: int, threshold: Optional[float]):
        self.run, self.at_step, self.threshold = run, at_step, threshold
        self.layers = {n: m for n, m in run.layers.items() if run.adapter in m.sparse_values}

    @torch.no_grad()
    def after_optimizer_step(self, t: int) -> dict:
        if t != self.at_step:
            return {}
        kept = total = 0
        for layer in self.layers.values():
            k, n = freeze_above_threshold(layer, self.run.adapter, self.threshold, self.run.optimizer)
            kept, total = kept + k, total + n
        if total and kept < 0.05 * total:
            # faithful to the rule, but the rest of the run then trains almost nothing: say why
            warnings.warn(
                f"SaRA's progressive step at step {t} kept only {kept} of {total} entries training: the updates "
                "have moved the others above the magnitude threshold, which is tiny for the smallest weights. The "
                "paper ties the learning rate to the threshold (lr = 1e-3·exp(-350·θ)); lower the learning rate, set "
                "a larger `threshold`, or progressive_step=0 to keep every entry training.",
                stacklevel=2,
            )
        return {"sparse/progressive_kept": kept / max(total, 1), "sparse/trainable_after_progressive": kept}


@torch.no_grad()
def freeze_above_threshold(layer, adapter: str, threshold: Optional[float], optimizer=None) -> tuple[int, int]:
    """Stop training every entry whose |w + Δ| is no longer below the threshold (SaRA §4.3).

    Without an absolute threshold (a per-layer fraction chose the support), the layer's own is
    implied: the largest |w| the selection took. Returns (entries still training, all entries).
    """
    values = layer.sparse_values[adapter]
    k = layer.sparse_indices[adapter].numel()  # not the values: ZeRO-3 leaves them empty outside forward
    if k == 0:
        return 0, 0
    delta = layer.get_delta(adapter, whole=True)
    rows, cols = delta.rows_cols()
    w0 = layer._base_weight_2d()[rows.to(values.device), cols.to(values.device)].float()
    limit = threshold if threshold is not None else float(w0.abs().max())
    frozen = (w0 + delta.effective_values().float()).abs() >= limit
    return k - layer.freeze_slots(adapter, frozen, optimizer), k
