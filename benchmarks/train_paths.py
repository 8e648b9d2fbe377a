"""Training's two paths for an unstructured update, step by step: CSR products with torch's sampled gradient
against the fused one-GEMM path (a scratch W + Δ in blocks, a dense weight gradient), per method against PEFT
LoRA, at hidden 256 (4.3% dense at LoRA r=8's count) and 1024 (1.1%). The evidence for
`ops.SCRATCH_TRAIN_ABOVE_DENSITY`, the density above which training takes the fused path.

    python benchmarks/train_paths.py                  # about five minutes on 2 cores; prints a Markdown table

benchmarks/peak.py's models and setups (each method's preset at LoRA r=8's count, its SparseScheduler, AdamW),
4 × 256 tokens, 1 thread; each path forced by setting the threshold (0: always fused, 1: never); median of
6 steps after one, the setups taking turns step by step.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from sparse_peft import ops  # noqa: E402

METHODS = ["spiel", "sara", "dsee", "sltrain"]


def _peak_module():
    spec = importlib.util.spec_from_file_location("benchmarks_peak", os.path.join(os.path.dirname(os.path.abspath(__file__)), "peak.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ratios(peak, hidden: int, layers: int, steps: int = 6) -> dict:
    base = peak.run.build_base(SimpleNamespace(hidden=hidden, layers=layers, seq=256))
    budget = peak.run.target_budget(base)
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    setups = {"PEFT LoRA": None, **{f"{m} {path}": (m, limit) for m in METHODS for path, limit in (("CSR", 1.0), ("fused", 0.0))}}
    built = {name: peak.build(spec[0] if spec else name, base, budget) for name, spec in setups.items()}
    times = {name: [] for name in setups}
    for i in range(steps + 1):
        for name, (model, opt, scheduler, _) in built.items():
            if setups[name] is not None:
                ops.SCRATCH_TRAIN_ABOVE_DENSITY = setups[name][1]
            start = time.perf_counter()
            peak.step(model, opt, scheduler, ids)
            if i:
                times[name].append(time.perf_counter() - start)
    lora = statistics.median(times["PEFT LoRA"])
    return {name: statistics.median(t) / lora for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    peak = _peak_module()
    default = ops.SCRATCH_TRAIN_ABOVE_DENSITY
    rows = {hidden: ratios(peak, hidden, 4 if hidden == 256 else 2) for hidden in (256, 1024)}
    ops.SCRATCH_TRAIN_ABOVE_DENSITY = default
    print("Training step / PEFT LoRA's (median of 6 steps, 4 × 256 tokens, 1 thread)\n")
    print("| method | hidden 256, CSR | hidden 256, fused | hidden 1024, CSR | hidden 1024, fused |")
    print("|---|---|---|---|---|")
    for m in METHODS:
        cells = [f"{rows[h][f'{m} {p}']:.2f}" for h in (256, 1024) for p in ("CSR", "fused")]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
