"""What DeepSpeed ZeRO-3's module hooks cost a sparse adapter's training step (CPU, one process, no DeepSpeed needed).

    python benchmarks/zero3_path.py          # about a minute on 2 cores; prints a Markdown table

ZeRO-3 gathers a layer's parameters in forward hooks on every module. sparse_peft's fused one-GEMM path
(`ops.merged_sparse_linear`: one product against a scratch W + Δ) skips the base layer's own forward, so
it would read an empty, ungathered weight: `layer._fused_forward` gives up whenever the base layer has
hooks, and ZeRO-3 runs the general path (the base GEMM, then the update's own product). This measures that
path against the one the layer takes without hooks on the same model (since issue #17 that is the general path
too below 2% density, where it is faster: these supports then cost the same), with a no-op forward pre-hook on
every base layer standing in for DeepSpeed's (the gathering itself, communication, is not what is measured). A Llama with 1024-wide layers
(2752 FFN, 2 layers), 4 × 256 tokens, fp32, AdamW; median of 5 steps after 2 warm-up steps, 1 thread.
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_peft import SparseConfig

METHODS = {
    "SpIEL (1%, no regrowth)": dict(method="spiel", density=0.01, reselection_steps=0),
    "SaRA (1%, no schedule)": dict(method="sara", density=0.01, nuclear_norm_weight=0.0, progressive_step=0),
    "DSEE (r=8 + 0.5%)": dict(method="dsee", r=8, density=0.005),
    "SLTrain (r=8 + 0.5%)": dict(method="sltrain", r=8, density=0.005),
}


def _step_ms(model, ids, steps: int = 5) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2752, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)
    ids = torch.randint(0, 512, (4, 256), generator=torch.Generator().manual_seed(0))
    print("| method | no hooks, ms/step | general path (ZeRO-3), ms/step | ratio |")
    print("|---|---|---|---|")
    for name, fields in METHODS.items():
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(cfg).train(), SparseConfig(target_modules="all-linear", **fields))
        fused = _step_ms(model, ids)
        handles = [m.get_base_layer().register_forward_pre_hook(lambda mod, args: None)
                   for m in model.modules() if hasattr(m, "sparse_values")]
        general = _step_ms(model, ids)
        for h in handles:
            h.remove()
        print(f"| {name} | {fused:.0f} | {general:.0f} | {general / fused:.2f} |", flush=True)


if __name__ == "__main__":
    main()
