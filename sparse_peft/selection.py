"""Support rules: which entries, rows or columns of a weight train.

Every rule returns sorted, unique int64 indices: flat row-major indices into the (out × in) weight
for unstructured supports, row or column numbers for structured ones. The weight, when a rule
needs one, is given in linear orientation (out × in), already dequantized.

Random rules draw from a generator seeded per module (`module_seed`), so the same config on the
same model always picks the same support. That matters beyond reproducibility: TRL's reference
adapters copy only parameters, never buffers, and rely on re-injection giving the same indices.
"""

from __future__ import annotations

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


def _entries(rule: str, k: int, shape, seed: int, weight_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    numel = shape[0] * shape[1]
    if rule == "random":
        return random_subset(numel, k, seed)
    magnitude = weight_fn().detach().abs().reshape(-1)
    return top_k(magnitude, k, largest=(rule == "magnitude")).cpu()


def _channels(rule: str, k: int, shape, dim: int, seed: int, weight_fn) -> torch.Tensor:
    if rule == "random":
        return random_subset(shape[dim], k, seed)
    # the norm of each row (dim=0) or column (dim=1) of the weight
    norms = weight_fn().detach().float().norm(dim=1 - dim)
    return top_k(norms, k, largest=(rule == "magnitude")).cpu()


SELECTION_RULES = ("random", "magnitude", "small_magnitude")


def select(
    rule: str,
    structure: str,
    k: int,
    shape: tuple[int, int],
    seed: int,
    weight_fn: Optional[Callable[[], torch.Tensor]] = None,
) -> torch.Tensor:
    """Choose a support of size k.

    Args:
        rule: one of `SELECTION_RULES`. "magnitude" keeps the largest |w| (or row/column norms),
            "small_magnitude" the smallest, "random" a uniform draw.
        structure: "unstructured" (k entries), "rows" (k output rows) or "columns" (k input columns).
        shape: (out, in) of the weight in linear orientation.
        weight_fn: returns that weight; only called by rules that look at it.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {SELECTION_RULES}")
    if rule != "random" and weight_fn is None:
        raise ValueError(f"selection rule {rule!r} needs the base weight")
    if structure == "unstructured":
        return _entries(rule, k, shape, seed, weight_fn)
    if structure in ("rows", "columns"):
        return _channels(rule, k, shape, 0 if structure == "rows" else 1, seed, weight_fn)
    raise ValueError(f"unknown structure {structure!r}")
