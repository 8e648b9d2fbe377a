"""Serving and training at LoRA's cost (issue #17): time per new token decoding unmerged, and the true
peak memory of a training step, of every method against PEFT LoRA.

    python benchmarks/serving.py                  # hidden 256 and 1024: decoding at batch 1 and a mixed batch of 8,
                                                  # then the step peaks; ~8 min on 2 cores
    python benchmarks/serving.py --quick          # hidden 1024, batch 1, fewer tokens, and the step peaks at 1024
    python benchmarks/serving.py --no-peak        # decoding only
    python benchmarks/serving.py --forward        # one decoding forward, interleaved: steadier ratios (also the
                                                  # median of per-round ratios), ~1 min
    python benchmarks/serving.py --device cuda [--cuda-graphs]
                                                  # on a GPU: times after a synchronize, peaks from the CUDA
                                                  # allocator; --cuda-graphs decodes with a static cache, which
                                                  # generate compiles (torch.compile, mode reduce-overhead)

Greedy `generate` with the KV cache: a 32-token prompt, then 96 new tokens, one token per forward.
A Llama with grouped-query attention (8 heads, 4 KV heads), 2 layers, intermediate 2.6875 x hidden,
random weights (only time is measured), fp32. Every method at PEFT LoRA r=8's trainable count over
the seven projections (S²FT: LoRA's total over o_proj and down_proj), as benchmarks/run.py sets them
up, and every trainable tensor set to random non-zero values, so that no product is skipped (an
untrained LoRA B or sparse values would be zeros). Best of 5 rounds, the setups taking turns, each
round one full generation; 2 threads.

The mixed batch: 8 sequences, `adapter_names` cycling over three adapters of the method and
"__base__", against PEFT LoRA's own mixed batch of three LoRA adapters.

The step peaks: benchmarks/peak.py's measurement (every allocation of forward, backward, the method's
schedule, AdamW and zero_grad replayed; byte counts, exact, independent of load) on its models, hidden
256 (4 layers) and 1024 (2 layers), at 1 × 128 and 4 × 256 tokens: the steady state (steps 5-7) and, in
brackets where it differs, the start (steps 1-4: SpIEL opens its first gradient window, RoSA's warm-up runs).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparse_peft import METHODS, SparseConfig  # noqa: E402


def _load_run():
    spec = importlib.util.spec_from_file_location("benchmarks_run", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_run"] = module
    spec.loader.exec_module(module)
    return module


def base_model(hidden: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def randomize(model) -> None:
    """Every trainable tensor random and non-zero (nothing skipped), the supports as chosen."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build(name: str, base, budget, run, adapters: int = 1, device: str = "cpu"):
    """The setup `name` ("PEFT LoRA" or a method) on a copy of base, with `adapters` adapters."""
    def config():
        if name == "PEFT LoRA":
            return LoraConfig(r=run.R, lora_alpha=run.R, lora_dropout=0.0, target_modules=run.TARGETS)
        return SparseConfig(method=name, **run.method_kwargs(name, budget))

    model = get_peft_model(copy.deepcopy(base), config())
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", config())
    randomize(model)
    return model.to(device).eval()


def per_token(model, prompt, new_tokens: int, adapter_names=None, static: bool = False) -> float:
    """Seconds per new token of one greedy generation. `static`: a static KV cache, which generate compiles on a
    GPU (CUDA graphs); the first call of each model compiles, so keep it out of the timed rounds."""
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    if static:
        kwargs["cache_implementation"] = "static"
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / new_tokens


def table(hidden: int, batch: int, names: list[str], run, rounds: int, new_tokens: int, device: str = "cpu",
          static: bool = False) -> str:
    base = base_model(hidden)
    budget = run.target_budget(base)
    prompt = torch.randint(0, 256, (batch, 32), generator=torch.Generator().manual_seed(2)).to(device)
    mixed = batch > 1
    models = {"base": copy.deepcopy(base).to(device)} if not mixed else {}
    names = ["PEFT LoRA", *names]
    for name in names:
        models[name] = build(name, base, budget, run, adapters=3 if mixed else 1, device=device)
    adapter_names = (["default", "a1", "a2", "__base__"] * batch)[:batch] if mixed else None
    best = {name: float("inf") for name in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up (and, with a static cache, compilation)
            per_token(model, prompt, new_tokens if static else 4, None if name == "base" else adapter_names, static)
        for _ in range(rounds):
            for name, model in models.items():
                best[name] = min(best[name], per_token(model, prompt, new_tokens, None if name == "base" else adapter_names,
                                                       static))
    lora = best["PEFT LoRA"]
    what = f"batch {batch}, adapter_names over 3 adapters + __base__" if mixed else "batch 1"
    what += f"; {device}" + (", static cache compiled (CUDA graphs)" if static else "")
    lines = [f"hidden {hidden}, intermediate {int(hidden * 2.6875)}, 2 layers; {what}; ms per new token (best of {rounds})", "",
             "| setup | ms / token | / PEFT LoRA |", "|---|---|---|"]
    lines += [f"| {name} | {t * 1e3:.2f} | {t / lora:.2f} |" for name, t in best.items()]
    return "\n".join(lines)


def forward_table(hidden: int, names: list[str], run, rounds: int = 30, calls: int = 20, device: str = "cpu") -> str:
    """One decoding forward (one token, no KV cache to grow) per call, the setups taking turns `rounds` times,
    `calls` calls each: the best per setup, and the median over rounds of each round's ratio to PEFT LoRA's
    (measured seconds apart, so the machine's drift between rounds cancels): steadier than whole generations."""
    import statistics

    base = base_model(hidden)
    budget = run.target_budget(base)
    models = {name: build(name, base, budget, run, device=device) for name in ["PEFT LoRA", *names]}
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(2)).to(device)
    cuda = ids.device.type == "cuda"
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    model(input_ids=ids)
                if cuda:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / calls)
    lora = times["PEFT LoRA"]
    lines = [f"hidden {hidden}: one decoding forward, ms (best of {rounds} interleaved rounds of {calls} calls)", "",
             "| setup | ms / forward | / PEFT LoRA (bests) | / PEFT LoRA (median of per-round ratios) |",
             "|---|---|---|---|"]
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, lora))
        lines.append(f"| {name} | {min(t) * 1e3:.2f} | {min(t) / min(lora):.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def peak_table(hiddens: list[int], names: list[str], device: str = "cpu") -> str:
    """Step peak / PEFT LoRA's per method at 1 × 128 and 4 × 256 tokens, from benchmarks/peak.py."""
    spec = importlib.util.spec_from_file_location("benchmarks_peak", os.path.join(os.path.dirname(os.path.abspath(__file__)), "peak.py"))
    peak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak)
    peak.setups = lambda: ["floor", "PEFT LoRA", *names]
    columns, cells = [], {}
    for hidden in hiddens:
        layers = 4 if hidden == 256 else 2
        for batch, seq in ((1, 128), (4, 256)):
            rows = peak.measure(hidden, layers, batch, seq, device)
            lora = next(r for r in rows if r["name"] == "PEFT LoRA")
            column = f"hidden {hidden}, {batch} × {seq}"
            columns.append(column)
            for r in rows:
                steady, first = r["steady"] / lora["steady"], r["first"] / lora["first"]
                text = f"{steady:.2f}" + (f" ({first:.2f})" if abs(first - steady) >= 0.005 else "")
                cells.setdefault(r["name"], {})[column] = text
            cells.setdefault("PEFT LoRA (MiB)", {})[column] = f"{lora['steady'] / 2**20:.2f}"
    lines = ["True peak of one training step / PEFT LoRA's (steps 5-7; steps 1-4 in brackets where they differ)", "",
             "| setup | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in cells.items():
        lines.append(f"| {name} | " + " | ".join(row[c] for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=sorted(METHODS))
    p.add_argument("--rounds", type=int, help="rounds per setup, the best one counts (default 5; --quick 3)")
    p.add_argument("--shapes", nargs="*", help="hidden:batch pairs (default 256:1 1024:1 1024:8; --quick 1024:1)")
    p.add_argument("--no-peak", action="store_true", help="skip the training-step peaks")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peaks from torch.cuda.max_memory_allocated)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode with a static KV cache, which generate compiles on a GPU (mode reduce-overhead)")
    p.add_argument("--forward", action="store_true",
                   help="only the steadier single-forward measure at hidden 1024 (about a minute)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        p.error("--cuda-graphs needs --device cuda: generate compiles a static cache's forward on a GPU only")
    torch.set_num_threads(args.threads)
    run = _load_run()
    rounds, new_tokens = (3, 32) if args.quick else (5, 96)
    rounds = args.rounds or rounds
    shapes = [(1024, 1)] if args.quick else [(256, 1), (1024, 1), (1024, 8)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes]
    if args.forward:
        print(forward_table(1024, args.methods, run, device=args.device), flush=True)
        return
    for hidden, batch in shapes:
        print(table(hidden, batch, args.methods, run, rounds, new_tokens, args.device, args.cuda_graphs) + "\n",
              flush=True)
    if not args.no_peak:
        torch.set_num_threads(1)  # byte counts do not depend on it; one thread keeps the allocation order plain
        print(peak_table([1024] if args.quick else [256, 1024], args.methods, args.device), flush=True)


if __name__ == "__main__":
    main()
