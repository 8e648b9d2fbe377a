"""Memory per rank of a sharded fine-tuning run, computed from a model's shapes (no model is built).

    python benchmarks/distributed_plan.py                 # Llama-2-7B and Llama-2-70B shapes, 8 ranks
    python benchmarks/distributed_plan.py --ranks 16

FSDP2 (and ZeRO-3) shard every parameter, its gradient and its optimizer state over the ranks; sparse_peft's
index buffers are never sharded (every rank holds them whole, int32: 4 bytes per unstructured entry).
Counted per rank: the frozen base (bf16), the adapter's trainable values (fp32), their gradients (fp32),
AdamW's two moments (fp32), the indices. Activations depend on batch and sequence and are left out.
"""

from __future__ import annotations

import argparse

from sparse_peft import METHODS, SparseConfig
from sparse_peft.methods import lora_budget


SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "Llama-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "Llama-2-70B": (8192, 28672, 80, 64, 8, 32000),
}
RANK = 16


def linear_shapes(hidden, inter, layers, heads, kv, vocab):
    head_dim, kv_dim = hidden // heads, hidden // heads * kv
    block = {"q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden), "o_proj": (hidden, hidden),
             "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    base = layers * sum(o * i for o, i in block.values()) + 2 * vocab * hidden + (2 * layers + 1) * hidden
    return block, base, layers


def adapter_counts(name: str, block: dict, layers: int) -> tuple[int, int]:
    """(trainable parameters, index entries) of method `name` at LoRA-16's trainable count, all linear layers."""
    lora = layers * sum(RANK * (o + i) for o, i in block.values())
    if name == "lora":
        return lora, 0
    method = METHODS[name]
    targets = ("o_proj", "down_proj") if method.default_targets == "roles" else tuple(block)
    fields = dict(num_trainable=lora) if method.default_targets == "roles" else dict(lora_budget(name, RANK))
    fields.update({"warmup_steps": 1} if "warmup_steps" in getattr(method.Knobs, "__dataclass_fields__", {}) else {})
    config = SparseConfig(method=name, **fields)
    if config.num_trainable is not None:  # spread in proportion to layer size, as SparseModel does
        config.density = lora / (layers * sum(o * i for t, (o, i) in block.items() if t in targets))
        config.num_trainable = None
    trainable = indices = 0
    for target in targets:
        out_f, in_f = block[target]
        if config.structure != "none":
            k = config.budget(config.structure, out_f, in_f, target)
            per_unit = {"unstructured": 1, "rows": in_f, "columns": out_f}[config.structure]
            trainable += layers * k * per_unit
            indices += layers * k
        trainable += layers * config.r * (out_f + in_f)
    return trainable, indices


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=8)
    args = p.parse_args()
    for model, dims in SHAPES.items():
        block, base, layers = linear_shapes(*dims)
        print(f"\n### {model}: {base / 1e9:.2f}B parameters, {args.ranks} ranks (GiB per rank)\n")
        print("| adapter (LoRA-16 parity) | trainable | base bf16 | values + grads + AdamW | indices (whole on every rank) | total |")
        print("|---|---|---|---|---|---|")
        for name in ["lora", *sorted(METHODS)]:
            trainable, entries = adapter_counts(name, block, layers)
            base_bytes = 2 * base / args.ranks
            train_bytes = 16 * trainable / args.ranks  # fp32 value, gradient, two AdamW moments
            index_bytes = 4 * entries
            print(f"| {name} | {trainable / 1e6:.1f}M | {gib(base_bytes)} | {gib(train_bytes)} | {gib(index_bytes)} | "
                  f"{gib(base_bytes + train_bytes + index_bytes)} |")


if __name__ == "__main__":
    main()
