"""The CSR product against the older paths, and the adapter's share of a decoding forward (issue #17).

    python benchmarks/csr_timings.py            # about four minutes on 2 cores; prints seven Markdown tables
    python benchmarks/csr_timings.py samples    # only the tables named (forward training share prompt kernels
                                                # per_call samples)

1. Forward of an unstructured update alone, x Δᵀ, at LoRA r=8's count ((out + in)·8 entries), per path:
   `ops.csr_times` (the support's CSR pattern from an `ops.Layout`), the gather, dense row blocks; and PEFT-LoRA-
   style two thin products for reference. 2 threads, best of 3 × many calls, µs.
2. Training's general path (`ops.sparse_linear` with a gradient: a bf16 or hooked base, several adapters):
   one layer's forward + backward without a Layout (as before issue #17) and with one (CSR forward, dx through
   the transposed pattern). 1 thread, best of 5, ms.
3. The adapter's share of one decoding forward of a 2752 × 1024 `gate_proj` inside benchmarks/serving.py's
   model: the layer's time minus its base layer's, median of 400 interleaved pairs, 1 thread, µs.
4. A prompt at inference, the whole layer: the base GEMM plus the CSR product against the fused path (one
   GEMM per block of W + Δ, 1 MiB blocks), by tokens × entries over out × in (`ops.SCRATCH_ABOVE`, the ratio
   above which inference takes the fused path). 1 thread, best of 3, ms.
5. Training's kernels one at a time (2 threads): the weight gradient at the support by torch's SDDMM in token
   chunks (`ops.csr_grad`) against the dense dyᵀx read at the support, and the CSR forward in token chunks
   (`ops.csr_times`) against one whole product; ms, and the most MiB each forms beyond its result
   (`sparse_peft.memory.peak_memory`). Then SaRA's nuclear-norm subgradient read at the support (LoRA r=8's
   count of entries): the full SVD of the dense ΔW, the Gram matrix's eigendecomposition (`nuclear_subgradient`,
   the default on large layers) and nuclear_norm_rank=8; the peak in units of the layer's fp32 weight, seconds.
6. Per-call work of one decoding call (one token, no grad) on a 256 × 256 layer, where the products cost
   almost nothing: PEFT LoRA against SpIEL, SaRA and DSEE at LoRA r=8's count, and the base layer alone. 2
   threads, best of 5 × 20,000 calls, µs.
7. A mixed batch at decoding (`layer.DECODE_SAMPLES_MAX`): an adapter's n one-token samples as one CSR product
   over the group (`ops.csr_times`) against one matrix-vector product per sample into its row (`ops.decode_add`),
   1024 × 1024 at LoRA r=8's count, 2 threads, best of 5 × 5,000 calls, µs.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
import warnings

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

import torch  # noqa: E402

from sparse_peft import ops  # noqa: E402

SHAPES = [(1024, 1024), (2752, 1024)]


def _support(out_f, in_f):
    k = (out_f + in_f) * 8
    idx = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(0))[:k].sort().values.to(torch.int32)
    return k, idx


def _best(fn, calls: int, rounds: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def forward_table() -> str:
    torch.set_num_threads(2)
    lines = ["| layer | tokens | CSR | gather (rows/columns split per call, as before) | dense row blocks | two thin products (LoRA r=8) |", "|---|---|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        k, idx = _support(out_f, in_f)
        v, layout = torch.randn(k), ops.Layout(idx, in_f)
        a_, b_ = torch.randn(8, in_f), torch.randn(out_f, 8)
        for n in (1, 8, 1024):
            x = torch.randn(n, in_f)
            calls = 2000 if n == 1 else 200 if n == 8 else 3
            t = {
                "csr": _best(lambda: ops.csr_times(x, v, layout, out_f), calls),
                "gather": _best(lambda: ops._times_delta(x, v, idx, (out_f, in_f), False, "gather"), calls),
                "dense": _best(lambda: ops._times_delta(x, v, idx, (out_f, in_f), False, "dense"), calls),
                "lora": _best(lambda: (x @ a_.t()) @ b_.t(), calls),
            }
            lines.append(f"| {out_f} × {in_f} | {n} | " + " | ".join(f"{t[c] * 1e6:.0f} µs" for c in ("csr", "gather", "dense", "lora")) + " |")
    return "\n".join(lines)


def training_table() -> str:
    torch.set_num_threads(1)
    lines = ["| layer | tokens | forward + backward, no Layout | with a Layout |", "|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        k, idx = _support(out_f, in_f)
        layout = ops.Layout(idx, in_f)
        for n in (128, 1024):
            x, v, dy = torch.randn(n, in_f, requires_grad=True), torch.randn(k, requires_grad=True), torch.randn(n, out_f)
            times = [_best(lambda lay=lay: ops.sparse_linear(x, v, idx, out_f, None, lay).backward(dy), 1, 5)
                     for lay in (None, layout)]
            lines.append(f"| {out_f} × {in_f} | {n} | {times[0] * 1e3:.1f} ms | {times[1] * 1e3:.1f} ms |")
    return "\n".join(lines)


def decoding_share_table() -> str:
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("serving", os.path.join(os.path.dirname(os.path.abspath(__file__)), "serving.py"))
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    run = serving._load_run()
    base = serving.base_model(1024)
    budget = run.target_budget(base)
    x = torch.randn(1, 1, 1024)
    lines = ["| setup | adapter's share of a decoding forward |", "|---|---|"]
    with torch.no_grad():
        for name in ("PEFT LoRA", "lora_ggpo", "spiel", "dsee"):
            layer = serving.build(name, base, budget, run).base_model.model.model.layers[0].mlp.gate_proj
            shares = []
            for _ in range(400):
                t0 = time.perf_counter_ns()
                for _ in range(10):
                    layer(x)
                t1 = time.perf_counter_ns()
                for _ in range(10):
                    layer.base_layer(x)
                shares.append(((t1 - t0) - (time.perf_counter_ns() - t1)) / 10 / 1e3)
            lines.append(f"| {name} | {statistics.median(shares):.0f} µs |")
    return "\n".join(lines)


def prompt_table() -> str:
    torch.set_num_threads(1)
    lines = ["| layer | tokens | tokens · k / (out · in) | base GEMM + CSR | fused, blocks of W + Δ | fused / (base + CSR) |",
             "|---|---|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        k, idx = _support(out_f, in_f)
        v, layout, w = torch.randn(k) * 0.01, ops.Layout(idx, in_f), torch.randn(out_f, in_f) * 0.02
        for n in (32, 128, 512, 2048):
            x = torch.randn(n, in_f)
            calls = max(1, 256 // n)
            general = _best(lambda: torch.nn.functional.linear(x, w) + ops.csr_times(x, v, layout, out_f), calls)
            fused = _best(lambda: ops.MergedSparseLinear.forward(ops._NoContext(), x, w, None, v, idx), calls)
            lines.append(f"| {out_f} × {in_f} | {n} | {n * k / (out_f * in_f):.2f} | {general * 1e3:.2f} | "
                         f"{fused * 1e3:.2f} | {fused / general:.2f} |")
    return "\n".join(lines)


def kernels_table() -> str:
    from sparse_peft.delta import Delta
    from sparse_peft.memory import peak_memory
    from sparse_peft.methods.sara import nuclear_factors, nuclear_subgradient

    torch.set_num_threads(2)

    def measure(fn, calls):
        with peak_memory() as peak:
            result = fn()
        return _best(fn, calls) * 1e3, (peak.bytes - result.numel() * result.element_size()) / 2**20

    lines = ["| layer | tokens | gradient at the support: SDDMM (ms, MiB) | dense dyᵀx (ms, MiB) "
             "| forward: CSR in chunks (ms, MiB) | one whole CSR product (ms, MiB) |", "|---|---|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        k, idx = _support(out_f, in_f)
        v, layout = torch.randn(k), ops.Layout(idx, in_f)
        matrix = torch.sparse_csr_tensor(*layout.csr(out_f), v, (out_f, in_f))
        for n in (128, 1024):
            x, dy = torch.randn(n, in_f), torch.randn(n, out_f)
            calls = 3 if n == 1024 else 20
            cells = [measure(lambda: ops.csr_grad(dy, x, layout, torch.float32), calls),
                     measure(lambda: (dy.t() @ x).view(-1)[idx.long()], calls),
                     measure(lambda: ops.csr_times(x, v, layout, out_f), calls),
                     measure(lambda: (matrix @ x.t()).t(), calls)]
            lines.append(f"| {out_f} × {in_f} | {n} | " + " | ".join(f"{t:.1f}, {m:.2f}" for t, m in cells) + " |")
    lines += ["", "| SaRA's nuclear-norm subgradient | full SVD (peak in fp32 weights, s) | Gram + eigh, the default "
              "(peak, s) | nuclear_norm_rank=8 (peak, s) |", "|---|---|---|---|"]
    for out_f, in_f in SHAPES:
        k, flat = _support(out_f, in_f)
        delta = Delta(out_f, in_f, values=torch.randn(k, generator=torch.Generator().manual_seed(0)), indices=flat)
        ways = [lambda: delta.factor_grad_parts(*nuclear_factors(delta)[1:]),
                lambda: nuclear_subgradient(delta), lambda: nuclear_subgradient(delta, rank=8)]
        cells = []
        for way in ways:
            with peak_memory() as peak:
                way()
            cells.append(f"{peak.bytes / (out_f * in_f * 4):.2f}, {_best(way, 1, 2):.2f}")
        lines.append(f"| {out_f} × {in_f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_call_table() -> str:
    import copy

    from peft import LoraConfig, get_peft_model

    from sparse_peft import SparseConfig

    torch.set_num_threads(2)
    base = torch.nn.Sequential(torch.nn.Linear(256, 256))
    x = torch.randn(1, 1, 256)
    setups = {"base layer alone": base[0]}
    setups["PEFT LoRA"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["0"])).eval().base_model.model[0]
    for method in ("spiel", "sara", "dsee"):
        model = get_peft_model(copy.deepcopy(base), SparseConfig(method=method, target_modules=["0"], num_trainable=4096)).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_()
        setups[method] = model.base_model.model[0]
    lines = ["| setup | one decoding call (µs) |", "|---|---|"]
    with torch.no_grad():
        for name, layer in setups.items():
            lines.append(f"| {name} | {_best(lambda: layer(x), 20_000, 5) * 1e6:.1f} |")
    return "\n".join(lines)


def samples_table() -> str:
    """A mixed batch at decoding: an adapter's n one-token samples as one CSR product over the group against n
    matrix-vector products, each into its sample's row (`layer.DECODE_SAMPLES_MAX`)."""
    torch.set_num_threads(2)
    out_f, in_f = 1024, 1024
    k, idx = _support(out_f, in_f)
    values = torch.randn(k)
    layout = ops.Layout(idx, in_f)
    lines = ["| samples | one CSR product over the group (µs) | one matrix-vector product per sample (µs) |",
             "|---|---|---|"]
    with torch.no_grad():
        for n in (1, 2, 4, 8):
            x, y = torch.randn(n, in_f), torch.zeros(n, out_f)

            def each():
                for j in range(n):
                    ops.decode_add(y[j], x[j], values, layout)

            group = _best(lambda: ops.csr_times(x, values, layout, out_f), 5000, 5)
            lines.append(f"| {n} | {group * 1e6:.1f} | {_best(each, 5000, 5) * 1e6:.1f} |")
    return "\n".join(lines)


TABLES = {"forward": forward_table, "training": training_table, "share": decoding_share_table, "prompt": prompt_table,
          "kernels": kernels_table, "per_call": per_call_table, "samples": samples_table}

if __name__ == "__main__":
    for name in sys.argv[1:] or TABLES:
        print(TABLES[name]() + "\n", flush=True)
