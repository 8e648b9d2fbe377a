"""A random k-subset of range(n) that is the same on every device, platform and torch version.

SLTrain's sparse factor S lives on a fixed, uniformly random support. Saving that support as an
index array would cost 4-8 bytes per trainable value, as much as the values themselves or more, so
an adapter file stores a seed and the values only, and the support is regenerated from the seed
when the file is loaded. That only works if regeneration gives the same indices wherever it runs.
torch's global RNG and `torch.Generator` do not promise that: their CPU and CUDA streams differ,
and the algorithms behind them may change between torch releases. So this module draws with its
own generator, built from integer operations that every backend computes exactly, and a test pins
some of its outputs to literal values so that a drift fails.

The subset (`seeded_subset`):
- Every position p gets a 62-bit key, a counter-based hash of (seed, p): no state is carried from
  one position to the next, so positions can be hashed in any order, in blocks of any size, on
  any device, and the keys come out the same.
- The subset is the k positions with the smallest keys, ties (only possible for n > 2^32) broken
  by position. Keys behave like independent uniform draws, so every k-subset is equally likely.
- Positions are hashed in blocks, and a block keeps only the positions whose key falls below a
  threshold set a few standard deviations above the expected k-th smallest key, so memory is
  O(block + k), never O(n). The threshold changes how much is kept, never which k positions win;
  if fewer than k survive (probability ~1e-15) the pass is redone with a larger threshold.

The hash: the top 32 bits of a key are w1 = fmix32(lowbias32(p_lo ^ seed_lo) ^ salt), where p_lo
is the low 32 bits of p and salt is a hash of the seed's high half, its low half and p's high bits.
lowbias32 (C. Wellons' hash-prospector) and fmix32 (MurmurHash3's finalizer) are well-known
bijections of 32-bit integers, so within each 2^32 positions w1 never repeats. The low 30 bits of
the key only rank equal w1 across those ranges; they are computed for the survivors only. The seed
enters both rounds: were it only XORed into p_lo, seeds with the same high half would give subsets
that are XOR-translates of each other.

Exactness: all values live in int64 tensors and stay in [0, 2^32) between operations. Products
by a 32-bit constant c could reach 2^64 and overflow, so constants ≥ 2^31 are replaced by c - 2^32
(the same number mod 2^32): then |x·c| < 2^63, the product is exact, and masking its two's
complement with 0xFFFFFFFF leaves x·c mod 2^32. Right shifts only ever see non-negative values.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch


_M32 = 0xFFFFFFFF
# Default block sizes, measured (torch 2.13): on CPU 2^15 positions keep both int64 buffers in L2
# and each op on one thread, 2-3x faster than 2^22 (more on a busy machine, where torch's threads
# wait on each other); on a GPU, kernel launches and the per-block sync of `nonzero` dominate.
_CPU_BLOCK = 1 << 15
_GPU_BLOCK = 1 << 22
# Standard deviations of headroom in the first pass: fewer than k survivors has probability ~1e-15.
_Z = 8.0


def _mul32(x: torch.Tensor, c: int) -> None:
    """x ← x·c mod 2^32, in place, for x in [0, 2^32): see the module docstring for why c - 2^32."""
    x *= c - (1 << 32) if c >= 1 << 31 else c
    x &= _M32


def _xorshift(x: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    torch.bitwise_right_shift(x, s, out=tmp)
    x ^= tmp


def _lowbias32(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    _xorshift(x, 16, tmp)
    _mul32(x, 0x7FEB352D)
    _xorshift(x, 15, tmp)
    _mul32(x, 0x846CA68B)
    _xorshift(x, 16, tmp)
    return x


def _fmix32(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    _xorshift(x, 16, tmp)
    _mul32(x, 0x85EBCA6B)
    _xorshift(x, 13, tmp)
    _mul32(x, 0xC2B2AE35)
    _xorshift(x, 16, tmp)
    return x


def _scalar(mix, v: int) -> int:
    # The per-seed constants go through the same code as the keys: one definition of each mixer.
    x = torch.tensor([v & _M32], dtype=torch.int64)
    return int(mix(x, torch.empty_like(x)))


def _salts(seed: int, hi: int) -> tuple[int, int]:
    """Constants of the key hash for seed and the 2^32 positions starting at hi·2^32.

    For a fixed seed_lo and hi, salt1 is a bijection of seed_hi, so distinct seeds never share
    both inputs of the first-round hash.
    """
    s_lo, s_hi = seed & _M32, seed >> 32
    h = _scalar(_fmix32, hi ^ 0x9E3779B9)
    salt1 = _scalar(_lowbias32, _scalar(_fmix32, s_hi ^ h) ^ s_lo)
    salt2 = _scalar(_fmix32, salt1 ^ 0x632BE5AB)
    return salt1, salt2


def _candidates(n: int, seed: int, threshold: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, keys) of every position whose top 32 key bits are below threshold, by position."""
    x = torch.empty(block, dtype=torch.int64, device=device)
    tmp = torch.empty_like(x)
    positions, keys = [], []
    for base in range(0, n, 1 << 32):
        salt1, salt2 = _salts(seed, base >> 32)
        end = min(n, base + (1 << 32))
        pos, top = [], []
        for start in range(base, end, block):
            m = min(block, end - start)
            w1, t = x[:m], tmp[:m]
            torch.arange(start - base, start - base + m, out=w1)
            w1 ^= seed & _M32
            _lowbias32(w1, t)
            w1 ^= salt1
            _fmix32(w1, t)
            idx = torch.nonzero(w1 < threshold).squeeze(1)
            pos.append(idx + start)
            top.append(w1[idx])
        # Low key bits, for the survivors only: another round, with a salt that differs per 2^32 range.
        w1 = torch.cat(top)
        w2 = _lowbias32(w1 ^ salt2, torch.empty_like(w1))
        positions.append(torch.cat(pos))
        keys.append((w1 << 30) | (w2 >> 2))
    return torch.cat(positions), torch.cat(keys)


def seeded_subset(n: int, k: int, seed: int, device=None, block: Optional[int] = None) -> torch.Tensor:
    """k distinct integers from [0, n), sorted, int64: a uniformly random k-subset fixed by (n, k, seed).

    The same (n, k, seed) gives the same tensor on every device, platform and torch version, and
    for every `block` (positions hashed at a time; default: fastest measured for the device).
    Memory is O(block + k). seed is an integer in [0, 2^64), e.g. from `seed_for`.
    """
    if not 0 < k <= n:
        raise ValueError(f"seeded_subset needs 0 < k <= n, got k={k} and n={n}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seeded_subset needs a seed in [0, 2**64), got {seed}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if block is None:
        block = _CPU_BLOCK if device.type == "cpu" else _GPU_BLOCK
    if block <= 0:
        raise ValueError(f"seeded_subset needs block > 0, got {block}")
    block = min(block, n)
    z = _Z
    while True:
        # Positions with w1 < threshold number about n·threshold/2^32 = k + z·√k + z²: z standard
        # deviations above k (the z² covers small k). Past 2^32 every position is kept.
        expected = k + z * math.sqrt(k) + z * z
        threshold = min(1 << 32, math.ceil(expected / n * 2.0**32))
        positions, keys = _candidates(n, seed, threshold, block, device)
        if positions.numel() >= k:
            break
        z *= 4
    # The k smallest keys: all below the k-th smallest, then as many equal to it as are missing,
    # by position. Candidates are in position order, so the result is sorted without a sort.
    kth = torch.kthvalue(keys, k).values
    below = keys < kth
    equal = keys == kth
    missing = k - int(below.sum())
    return positions[below | (equal & (equal.cumsum(0) <= missing))]


def seed_for(seed: int, module_key: str) -> int:
    """A 62-bit seed for one module from a user seed and the module's name.

    Deterministic across processes, platforms and Python versions (unlike `hash`), and unrelated
    seeds for unrelated names: BLAKE2b of both, not an arithmetic combination.
    """
    digest = hashlib.blake2b(f"{seed}:{module_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2
