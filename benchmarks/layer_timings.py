"""Layer-level timings behind four choices in sparse_peft's ops (CPU, one thread by default).

    python benchmarks/layer_timings.py                       # writes docs/kernels.md (about five minutes)
    python benchmarks/layer_timings.py --only crossover      # the crossover table alone, printed

1. The unstructured update's crossover: sparse kernels (`torch.sparse.mm` and a sampled gradient)
   against dense GEMMs on row blocks of Δ and dW, over densities (`ops.SPARSE_KERNEL_BELOW_DENSITY`).
2. LoRA-GGPO: the LoRA update folded into the noisy scratch weight, against the noisy base layer
   beside LoRA's own product (the path before the fold), and against plain LoRA on a frozen layer.
3. Few tokens: the gather over an unstructured support (`ops.product_mode` "gather") against the
   scratch W + Δ of the fused path, one token per forward, no gradient (decoding).
4. `index_add_` along dim 1 with int32 and with int64 indices (the row/column updates' scatter).

Each row is the median of many interleaved calls; ratios are within a row, measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

# benchmarks/layer_timings.py would shadow the `kernels` package that transformers imports: keep this folder off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch
import torch.nn.functional as F

from sparse_peft import ops
from sparse_peft.perturbation import perturbed_linear


def timed(fns: dict, rounds: int) -> dict:
    """Median milliseconds of each function, the functions taking turns call by call."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


CROSSOVER_DENSITIES = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.04)
# (out, in, tokens): a Llama-7B-sized projection, a benchmark-wide MLP layer, a small square one
CROSSOVER_SHAPES = ((4096, 4096, 256), (2752, 1024, 1024), (1024, 1024, 1024))


def _forced(mode: str, fn):
    """fn run with `ops.product_mode` forced to "sparse" or "dense" (the threshold set to always or never)."""
    def call():
        saved = ops.SPARSE_KERNEL_BELOW_DENSITY
        ops.SPARSE_KERNEL_BELOW_DENSITY = 2.0 if mode == "sparse" else 0.0
        try:
            fn()
        finally:
            ops.SPARSE_KERNEL_BELOW_DENSITY = saved
    return call


def crossover_rows(rounds: int) -> tuple[list[list[str]], list[tuple[int, int, int, float]]]:
    """Sparse kernels against dense row blocks, per layer and density: the unstructured update's forward and
    backward (`ops.sparse_linear`, the general path) and the weight gradient at the support alone (`ops.grad_at`,
    all the fused path's backward switches). Returns the table rows and, per layer, the density where
    sparse / dense crosses 1 (geometric interpolation between the measured densities; nan if it does not)."""
    rows, crossings = [], []
    for out_f, in_f, n in CROSSOVER_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, in_f, generator=g, requires_grad=True)
        dy = torch.randn(n, out_f, generator=g)
        ratios = []
        for density in CROSSOVER_DENSITIES:
            k = int(density * out_f * in_f)
            idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.int()
            v = torch.randn(k, generator=g).requires_grad_()
            assert ops.product_mode(n, k, out_f, in_f) != "gather"
            update = lambda: ops.sparse_linear(x, v, idx, out_f).backward(dy)  # noqa: E731
            grad = lambda: ops.grad_at(dy, x.detach(), idx, torch.float32)  # noqa: E731
            ms = timed({"sparse": _forced("sparse", update), "dense": _forced("dense", update),
                        "grad sparse": _forced("sparse", grad), "grad dense": _forced("dense", grad)}, rounds)
            ratio = ms["sparse"] / ms["dense"]
            ratios.append(ratio)
            rows.append([f"{out_f} × {in_f}, {n} tokens", f"{density:.1%}", f"{ms['sparse']:.1f}",
                         f"{ms['dense']:.1f}", f"{ratio:.2f}", f"{ms['grad sparse']:.1f}", f"{ms['grad dense']:.1f}",
                         f"{ms['grad sparse'] / ms['grad dense']:.2f}"])
        crossings.append((out_f, in_f, n, _crossing(CROSSOVER_DENSITIES, ratios)))
    return rows, crossings


def _crossing(densities, ratios) -> float:
    """The first density where the ratio goes from below 1 to at least 1, interpolated in log-log."""
    for (d0, r0), (d1, r1) in zip(zip(densities, ratios), zip(densities[1:], ratios[1:])):
        if r0 < 1 <= r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return math.nan


def crossover_text(rounds: int) -> str:
    rows, crossings = crossover_rows(rounds)
    found = ", ".join(f"{o} × {i} at {n} tokens: {c:.2%}" if c == c else f"{o} × {i} at {n} tokens: none in range"
                      for o, i, n, c in crossings)
    return f"""*sparse*: `torch.sparse.mm` with a COO Δ (forward and dx) and the sampled gradient (SDDMM) at the
support; *dense*: GEMMs on blocks of whole rows of Δ and of dW (≤ 2²² entries each, built from the values
and dropped). Each mode is forced by setting the threshold; the library picks sparse below
`ops.SPARSE_KERNEL_BELOW_DENSITY` = {ops.SPARSE_KERNEL_BELOW_DENSITY:.2%}. *update*: `ops.sparse_linear`
forward + backward (the general path: quantized or half-precision bases, several adapters, hooks);
*gradient*: `ops.grad_at` alone (the fused one-GEMM path's only switch). Times in ms.

{table(["layer", "density", "update sparse", "update dense", "sparse / dense", "gradient sparse", "gradient dense",
        "sparse / dense"], rows)}

Where *update* sparse / dense crosses 1 (interpolated): {found}."""


def ggpo_rows(rounds: int) -> list[list[str]]:
    rows = []
    for out_f, in_f in [(688, 256), (256, 688), (2048, 2048)]:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        std = torch.full((out_f,), 1e-3)
        a = torch.randn(8, in_f, generator=g).requires_grad_()
        b = torch.randn(out_f, 8, generator=g).requires_grad_()
        x = torch.randn(1024, in_f, generator=g, requires_grad=True)
        dy = torch.randn(1024, out_f, generator=g)
        ms = timed({
            "lora": lambda: (F.linear(x, w) + ops.low_rank_linear(x, a, b, 2.0)).backward(dy),
            "beside": lambda: (perturbed_linear(x, w, None, std, 5) + ops.low_rank_linear(x, a, b, 2.0)).backward(dy),
            "folded": lambda: perturbed_linear(x, w, None, std, 5, a, b, 2.0).backward(dy),
        }, rounds)
        rows.append([f"{out_f} × {in_f}", f"{ms['lora']:.2f}", f"{ms['beside']:.2f}", f"{ms['folded']:.2f}",
                     f"{ms['folded'] / ms['lora']:.2f}"])
    return rows


class _InGemmColumns(torch.autograd.Function):
    """PaCA's column update inside the base GEMM, kept separable: y = x·(W + B scattered into cols)ᵀ on a scratch
    copy of W, one GEMM; backward dx = dy·W' and dB = dyᵀ·x[:, cols] (the in-place form without the in-place write)."""

    @staticmethod
    def forward(ctx, x, weight, block, cols):
        scratch = weight.detach().clone().index_add_(1, cols, block.detach())
        ctx.save_for_backward(x[:, cols], scratch, cols)
        return F.linear(x, scratch)

    @staticmethod
    def backward(ctx, dy):
        x_cols, scratch, cols = ctx.saved_tensors
        return dy @ scratch, None, dy.t() @ x_cols, None


PACA_HEAD = ["layer", "lora", "beside", "in GEMM", "beside / lora", "in GEMM / lora"]


def paca_rows(rounds: int) -> list[list[str]]:
    """PaCA's separable forms per layer (forward + backward, 1,024 tokens, r = 8 columns) against PEFT LoRA r = 8."""
    rows = []
    for out_f, in_f in [(688, 256), (2752, 1024), (2048, 2048)]:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        cols = torch.randperm(in_f, generator=g)[:8].sort().values
        block = (torch.randn(out_f, 8, generator=g) * 0.01).requires_grad_()
        a = torch.randn(8, in_f, generator=g).requires_grad_()
        b = torch.randn(out_f, 8, generator=g).requires_grad_()
        x = torch.randn(1024, in_f, generator=g, requires_grad=True)
        dy = torch.randn(1024, out_f, generator=g)
        ms = timed({
            "lora": lambda: (F.linear(x, w) + F.linear(F.linear(x, a), b)).backward(dy),
            "beside": lambda: (F.linear(x, w) + ops.column_linear(x, block, cols)).backward(dy),
            "in_gemm": lambda: _InGemmColumns.apply(x, w, block, cols).backward(dy),
        }, rounds)
        rows.append([f"{out_f} × {in_f}", f"{ms['lora']:.2f}", f"{ms['beside']:.2f}", f"{ms['in_gemm']:.2f}",
                     f"{ms['beside'] / ms['lora']:.2f}", f"{ms['in_gemm'] / ms['lora']:.2f}"])
    return rows


def gather_rows(rounds: int) -> list[list[str]]:
    rows = []
    for out_f, in_f, density in [(2048, 2048, 0.01), (2752, 1024, 0.03), (688, 256, 0.04)]:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=g)
        k = int(density * out_f * in_f)
        idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.int()
        v = torch.randn(k, generator=g)
        x = torch.randn(1, in_f, generator=g)
        assert ops.product_mode(1, k, out_f, in_f) == "gather"
        with torch.no_grad():
            ms = timed({
                "base": lambda: F.linear(x, w),
                "scratch": lambda: ops.merged_sparse_linear(x, w, None, v, idx),
                "gather": lambda: F.linear(x, w) + ops.sparse_linear(x, v, idx, out_f),
            }, rounds)
        rows.append([f"{out_f} × {in_f}, {density:.0%}", f"{ms['base']:.3f}", f"{ms['scratch']:.3f}",
                     f"{ms['gather']:.3f}", f"{ms['scratch'] / ms['gather']:.1f}"])
    return rows


def index_add_rows(rounds: int) -> list[list[str]]:
    rows = []
    for n, out_f, s in [(1024, 688, 64), (1024, 4096, 256)]:
        g = torch.Generator().manual_seed(0)
        cols = torch.randperm(out_f, generator=g)[:s].sort().values
        src = torch.randn(n, s, generator=g)
        ms = timed({
            "zeros": lambda: torch.zeros(n, out_f),
            "int32": lambda: torch.zeros(n, out_f).index_add_(1, cols.int(), src),
            "int64": lambda: torch.zeros(n, out_f).index_add_(1, cols, src),
        }, rounds)
        scatter32, scatter64 = ms["int32"] - ms["zeros"], ms["int64"] - ms["zeros"]
        rows.append([f"{n} × {out_f}, {s} unique columns", f"{scatter32:.2f}", f"{scatter64:.2f}",
                     f"{scatter32 / max(scatter64, 1e-6):.1f}"])
    # the gather's scatter: one token, 1% of a 2048² layer, so each of the 2048 rows repeats ~20 times
    g = torch.Generator().manual_seed(0)
    rows_ = (torch.randperm(2048 * 2048, generator=g)[: 2048 * 2048 // 100].sort().values // 2048)
    src = torch.randn(1, rows_.numel(), generator=g)
    ms = timed({"int32": lambda: torch.zeros(1, 2048).index_add_(1, rows_.int(), src),
                "int64": lambda: torch.zeros(1, 2048).index_add_(1, rows_, src)}, rounds)
    rows.append([f"1 × 2048, {rows_.numel():,} repeated rows", f"{ms['int32']:.2f}", f"{ms['int64']:.2f}",
                 f"{ms['int32'] / ms['int64']:.1f}"])
    return rows


def table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="interleaved calls per function")
    p.add_argument("--crossover-rounds", type=int, default=7,
                   help="interleaved calls per function in the crossover table (its calls are the slow ones)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--only", choices=["crossover", "paca"], help="print one table only, write nothing")
    p.add_argument("--out", default="docs/kernels.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "crossover":
        print(crossover_text(args.crossover_rounds))
        return
    if args.only == "paca":
        print(table(PACA_HEAD, paca_rows(args.rounds)))
        return
    text = f"""# Layer-level timings

Generated by `python benchmarks/layer_timings.py` (do not edit by hand); CPU `{platform.processor() or platform.machine()}`,
torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} interleaved calls ({args.crossover_rounds} in the
crossover table). Whole-model figures are in [benchmarks.md](benchmarks.md).

## Unstructured update: sparse kernels against dense row blocks, by density

{crossover_text(args.crossover_rounds)}

## LoRA-GGPO: LoRA folded into the noisy weight (ms, forward + backward, 1,024 tokens, r = 8)

*lora*: a frozen layer plus LoRA's product; *beside*: the noisy layer plus LoRA's product (the path
before the fold); *folded*: one GEMM on W0 + ε + s·B·A. The noise is drawn twice per call either way.

{table(["layer", "lora", "beside", "folded", "folded / lora"], ggpo_rows(args.rounds))}

## PaCA: its column update beside the base GEMM or inside it (ms, forward + backward, 1,024 tokens)

*lora*: PEFT LoRA's pattern, r = 8; *beside*: the frozen GEMM plus x[:, cols]·Bᵀ (`ops.column_linear`,
what `method="paca"` runs), r = 8 columns; *in GEMM*: one GEMM on a scratch W + B scattered into the
columns (the paper's in-place form, kept separable by a copy of W each call).

{table(PACA_HEAD, paca_rows(args.rounds))}

## One token, no gradient: gather against the scratch weight (ms)

*base*: the frozen layer alone; *scratch*: the fused path's one GEMM on a copy of W + Δ; *gather*:
the base GEMM plus a gather over the support and a scatter-add (what decoding now takes).

{table(["layer, density", "base", "scratch", "base + gather", "scratch / gather"], gather_rows(args.rounds))}

## index_add_ along dim 1: int32 against int64 indices (ms, the scatter alone)

{table(["shape", "int32", "int64", "int32 / int64"], index_add_rows(args.rounds))}
"""
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
