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
            raise ValueError(f"cannot choose {k} units disjoint from the {exclude.numel()} already taken (of {n})")
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
)
# rules that score inputs by their size on calibration data (see calibration.py)
ACTIVATION_RULES = tuple(r for r in SELECTION_RULES if r.endswith("activation"))


class NeedsCalibration(ValueError):
    """The rule scores by activations, and none have been recorded yet."""


def select(
    rule: str,
    structure: str,
    k: int,
    shape: tuple[int, int],
    seed: int,
    weight_fn: Optional[Callable[[], torch.Tensor]] = None,
    group: int = 1,
    exclude: Optional[torch.Tensor] = None,
    activation: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Choose a support of size k.

    Args:
        rule: one of `SELECTION_RULES`. "magnitude" keeps the largest |w| (or row/column norms),
            "activation" the input columns of largest norm on calibration data, "weight_activation"
            the largest |w|·‖x_col‖ (Wanda's score; for columns ‖W[:, c]‖·‖x_c‖); each "small_"
            variant the smallest; "random" a uniform draw.
        structure: "unstructured" (k entries), "rows" (k output rows) or "columns" (k input columns).
        shape: (out, in) of the weight in linear orientation.
        weight_fn: returns that weight; only called by rules that look at it.
        group: rows or columns are chosen in whole groups of this many consecutive ones (attention
            heads: head_dim); k must be a multiple of it.
        exclude: indices of the same kind that must not be chosen (another adapter's support).
        activation: the norm of each input feature over calibration data, for the activation rules.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")
    kind = rule.removeprefix("small_")
    if kind in ("magnitude", "weight_activation") and weight_fn is None:
        raise ValueError(f"selection rule {rule!r} needs the base weight")
    if kind.endswith("activation"):
        if structure == "rows" or (structure == "unstructured" and kind == "activation"):
            raise ValueError(f"selection rule {rule!r} scores input columns: use it with structure='columns'"
                             + (" (or 'weight_activation' for single entries)" if structure == "unstructured" else ""))
        if activation is None:
            raise NeedsCalibration(f"selection rule {rule!r} needs activations: call sparse_peft.calibrate(model, batches)")
        activation = activation.detach().float().cpu()
    if structure == "unstructured":
        def entry_scores():
            scores = weight_fn().detach().float().abs().cpu()
            return (scores * activation[None, :] if kind == "weight_activation" else scores).reshape(-1)

        return _pick(rule, k, shape[0] * shape[1], seed, entry_scores, exclude)
    if structure not in ("rows", "columns"):
        raise ValueError(f"unknown structure {structure!r}")
    dim = 0 if structure == "rows" else 1
    if shape[dim] % group or k % group:
        raise ValueError(f"{shape[dim]} {structure} cannot be chosen in groups of {group} (k={k})")

    def group_norms():
        # a score per row (dim=0) or column (dim=1), then the norm of each group of them
        if kind == "activation":
            norms = activation
        else:
            norms = weight_fn().detach().float().norm(dim=1 - dim).cpu()
            if kind == "weight_activation":
                norms = norms * activation
        return norms.reshape(-1, group).norm(dim=1)

    excluded_groups = None if exclude is None else (exclude.long() // group).unique()
    groups = _pick(rule, k // group, shape[dim] // group, seed, group_norms, excluded_groups)
    return (groups[:, None] * group + torch.arange(group)).reshape(-1)
