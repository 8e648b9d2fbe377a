"""Support rules: which entries, rows or columns of a weight train.

Every rule returns sorted, unique int64 indices: flat row-major indices into the (out × in) weight
for unstructured supports, row or column numbers for structured ones. The weight, when a rule
needs one, is given in linear orientation (out × in), already dequantized.

Random rules draw from a generator seeded per module (`module_seed`), so the same config on the
same model always picks the same support. That matters beyond reproducibility: TRL's reference
adapters copy only parameters, never buffers, and rely on re-injection giving the same indices.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch


def module_seed(seed: int, module_key: str) -> int:
    """A seed for one module, stable across processes and Python versions (unlike `hash`)."""
    return (seed * 1_000_003 + zlib.crc32(module_key.encode())) % (2**63)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def random_subset(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct integers from [0, n), sorted, uniformly at random.

    For k much smaller than n this avoids `randperm(n)`, whose int64 buffer would cost 8·n bytes
    (360 MB for one 4096×11008 weight): draw with replacement, deduplicate, top up.
    """
    if not 0 < k <= n:
        raise ValueError(f"cannot choose {k} of {n} elements")
    g = _generator(seed)
    if k > n // 4:
        return torch.randperm(n, generator=g)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        extra = torch.randint(n, (k - chosen.numel() + k // 16 + 16,), generator=g)
        chosen = torch.cat([chosen, extra]).unique()
    # `unique` sorts, so trimming its head would bias towards small indices: trim at random instead.
    keep = torch.randperm(chosen.numel(), generator=g)[:k]
    return chosen[keep].sort().values


def top_k(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k largest (or smallest) scores of a 1-D tensor, sorted by index."""
    return torch.topk(scores.float(), k, largest=largest, sorted=False).indices.sort().values


def _pick(rule: str, k: int, n: int, seed: int, scores_fn, exclude: Optional[torch.Tensor]) -> torch.Tensor:
    """k of n units, never one in `exclude`: at random, or by the largest / smallest score."""
    allowed = None
    if exclude is not None and exclude.numel():
        allowed = torch.ones(n, dtype=torch.bool)
        allowed[exclude.long().cpu()] = False
        if int(allowed.sum()) < k:
            raise ValueError(
                f"cannot choose {k} units disjoint from the {exclude.numel()} that the adapters in disjoint_from "
                f"already take (of {n} on this layer): lower this adapter's density (or theirs), or drop disjoint_from"
            )
    if rule == "random":
        if allowed is None:
            return random_subset(n, k, seed)
        free = allowed.nonzero().squeeze(1)
        return free[random_subset(free.numel(), k, seed)]
    largest = not rule.startswith("small_")
    scores = scores_fn().detach().float().cpu()
    if allowed is not None:
        scores[~allowed] = -math.inf if largest else math.inf
    return top_k(scores, k, largest=largest)


SELECTION_RULES = (
    "random",
    "magnitude",
    "small_magnitude",
    "activation",
    "small_activation",
    "weight_activation",
    "small_weight_activation",
    "gradient",
    "small_gradient",
    "lowrank_residual",
)
# rules that score inputs by their size on calibration data (see calibration.py)
ACTIVATION_RULES = tuple(r for r in SELECTION_RULES if r.endswith("activation"))
# rules that score input columns by the norm of the loss gradient of the weight's column on calibration data
GRADIENT_RULES = ("gradient", "small_gradient")
# every rule that needs `sparse_peft.calibrate` before training
CALIBRATION_RULES = ACTIVATION_RULES + GRADIENT_RULES


class NeedsCalibration(ValueError):
    """The rule scores by activations or gradients, and none have been recorded yet."""


def select(
    rule: str,
    structure: str,
    k: int,
    shape: tuple[int, int],
    seed: int,
    weight_fn: Optional[Callable[[], torch.Tensor]] = None,
    group: int = 1,
    exclude: Optional[torch.Tensor] = None,
    calibration: Optional[torch.Tensor] = None,
    residual_rank: int = 8,
) -> torch.Tensor:
    """Choose a support of size k.

    Args:
        rule: one of `SELECTION_RULES`. "magnitude" keeps the largest |w| (or row/column norms),
            "activation" the input columns of largest norm on calibration data, "weight_activation"
            the largest |w|·‖x_col‖ (Wanda's score; for columns ‖W[:, c]‖·‖x_c‖), "gradient" the
            input columns of largest loss gradient ‖∂L/∂W[:, c]‖ on calibration data; each "small_"
            variant the smallest; "random" a uniform draw.
        structure: "unstructured" (k entries), "rows" (k output rows) or "columns" (k input columns).
        shape: (out, in) of the weight in linear orientation.
        weight_fn: returns that weight; only called by rules that look at it.
        group: rows or columns are chosen in whole groups of this many consecutive ones (attention
            heads: head_dim); k must be a multiple of it.
        exclude: indices of the same kind that must not be chosen (another adapter's support).
        calibration: one value per input feature from calibration data (calibration.py): its norm
            for the activation rules, the norm of the weight gradient's column for the gradient rules.
        residual_rank: rank of the low-rank fit whose residual "lowrank_residual" scores (DSEE).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")
    kind = rule.removeprefix("small_")
    if kind in ("magnitude", "weight_activation", "lowrank_residual") and weight_fn is None:
        raise ValueError(f"selection rule {rule!r} needs the base weight")
    if rule in CALIBRATION_RULES:
        if structure == "rows" or (structure == "unstructured" and kind != "weight_activation"):
            raise ValueError(f"selection rule {rule!r} scores input columns: use it with structure='columns'"
                             + (" (or 'weight_activation' for single entries)" if structure == "unstructured" else ""))
        if calibration is None:
            data = "gradients" if kind == "gradient" else "activations"
            raise NeedsCalibration(f"selection rule {rule!r} needs {data}: call sparse_peft.calibrate(model, batches)")
        calibration = calibration.detach().float().cpu()
    if rule == "lowrank_residual":
        if structure != "unstructured":
            raise ValueError("selection rule 'lowrank_residual' scores single entries: use structure='unstructured'")
        return _pick("magnitude", k, shape[0] * shape[1], seed, lambda: lowrank_residual(weight_fn(), residual_rank, seed).reshape(-1), exclude)
    if structure == "unstructured":
        def entry_scores():
            scores = weight_fn().detach().float().abs().cpu()
            return (scores * calibration[None, :] if kind == "weight_activation" else scores).reshape(-1)

        return _pick(rule, k, shape[0] * shape[1], seed, entry_scores, exclude)
    if structure not in ("rows", "columns"):
        raise ValueError(f"unknown structure {structure!r}")
    dim = 0 if structure == "rows" else 1
    if shape[dim] % group or k % group:
        raise ValueError(f"{shape[dim]} {structure} cannot be chosen in groups of {group} (k={k})")

    excluded_groups = None if exclude is None else (exclude.long() // group).unique()

    def scores():
        return _group_scores(kind, dim, group, weight_fn, calibration)

    groups = _pick(rule, k // group, shape[dim] // group, seed, scores, excluded_groups)
    return (groups[:, None] * group + torch.arange(group)).reshape(-1)


def _group_scores(kind: str, dim: int, group: int, weight_fn, calibration) -> torch.Tensor:
    """A score per row (dim=0) or column (dim=1), then the norm of each group of `group` of them."""
    if kind in ("activation", "gradient"):
        norms = calibration
    else:
        norms = weight_fn().detach().float().norm(dim=1 - dim).cpu()
        if kind == "weight_activation":
            norms = norms * calibration
    return norms.reshape(-1, group).norm(dim=1)


def select_global(
    rule: str,
    structure: str,
    k: int,
    shape: tuple[int, int],
    seed: int,
    weight_fns: list,
    group: int = 1,
    excludes: Optional[list] = None,
    calibrations: Optional[list] = None,
) -> list[torch.Tensor]:
    """Choose k rows or columns over several weights of one shape at once (one role in every layer).

    The units (rows, columns, or groups of `group` of them) of all weights are pooled: the rule
    picks the k // group best-scoring units of the pool, or draws them uniformly from it, and each
    weight gets the ones that fall in it, so counts differ between weights (possibly zero). Scores
    are those of `select`; `excludes` and `calibrations` hold one entry (or None) per weight.
    Returns one sorted index tensor per weight.
    """
    kind = rule.removeprefix("small_")
    if structure not in ("rows", "columns") or kind == "lowrank_residual":
        raise ValueError(f"global selection pools whole rows or columns, not {structure!r} with rule {rule!r}")
    if rule in CALIBRATION_RULES:
        if structure == "rows":
            raise ValueError(f"selection rule {rule!r} scores input columns: use it with structure='columns'")
        if calibrations is None or any(c is None for c in calibrations):
            raise NeedsCalibration(
                f"selection rule {rule!r} needs calibration data: call sparse_peft.calibrate(model, batches)"
            )
        calibrations = [c.detach().float().cpu() for c in calibrations]
    dim = 0 if structure == "rows" else 1
    if shape[dim] % group or k % group:
        raise ValueError(f"{shape[dim]} {structure} cannot be chosen in groups of {group} (k={k})")
    n = shape[dim] // group  # units per weight
    excluded = [(e.long().cpu() // group).unique() + i * n for i, e in enumerate(excludes or []) if e is not None]

    def pooled_scores():
        return torch.cat([
            _group_scores(kind, dim, group, fn, None if calibrations is None else calibrations[i])
            for i, fn in enumerate(weight_fns)
        ])

    excluded = torch.cat(excluded) if excluded else None
    units = _pick(rule, k // group, n * len(weight_fns), seed, pooled_scores, excluded)
    offsets = torch.arange(group)
    return [((units[units // n == i] % n)[:, None] * group + offsets).reshape(-1) for i in range(len(weight_fns))]


@torch.no_grad()
def lowrank_residual(weight: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """|W - W_r|, W_r a rank-`rank` approximation of W: DSEE's "sparse part of the pretrained weight".

    The entries a low-rank fit leaves unexplained are where DSEE puts its sparse update. A randomized
    SVD (a few power iterations) gives W_r in O(out·in·rank) instead of a full SVD's O(out·in·min);
    its random start comes from `seed`, so the support is reproducible.
    """
    w = weight.detach().float()
    rank = min(rank, *w.shape)
    # svd_lowrank draws its start from the global generator: seed it, and leave the user's state as it was
    with torch.random.fork_rng(devices=[w.device] if w.device.type != "cpu" else [], device_type=w.device.type):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 8, *w.shape), niter=4)
    return (w - (u[:, :rank] * s[:rank]) @ v[:, :rank].T).abs().cpu()


@torch.no_grad()
def below_threshold(weight: torch.Tensor, threshold: float, block_rows: int = 1024) -> torch.Tensor:
    """Flat row-major indices of the entries with |w| < threshold (SaRA), found row block by row block
    so that no full-size mask exists at once."""
    found = []
    in_features = weight.shape[1]
    for r0 in range(0, weight.shape[0], block_rows):
        block = weight[r0 : r0 + block_rows].detach().float().abs()
        found.append(((block < threshold).reshape(-1).nonzero().squeeze(1) + r0 * in_features).cpu())
    return torch.cat(found) if found else torch.empty(0, dtype=torch.long)
