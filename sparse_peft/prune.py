"""DSEE's second sparsity: prune the final weights after fine-tuning.

    model, report = sparse_peft.prune(peft_model, sparsity=0.5)                  # unstructured
    model, report = sparse_peft.prune(peft_model, heads_per_layer=2)             # attention heads
    print(report)

The adapter is merged first and the pruning applies to the merged weights W + ΔW of the adapted
layers, so what is pruned stays pruned (DSEE's code masks W only and leaves the dense update on
top, so its merged weights are not sparse). One shot, no retraining here: retrain a fresh adapter
on the pruned model if accuracy needs it, as the paper does.

What it saves at inference: unstructured zeros shrink the model only for a sparse storage format
or a sparse kernel (at 50% or more; dense GEMMs do not skip zeros); pruned heads contribute
nothing, and their rows and columns can be cut out of the projections for real FLOP savings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from . import architectures
from .layer import adapter_layers


@dataclass
class PruneReport:
    structure: str
    sparsity: float  # fraction of zeros in the pruned weights, measured after pruning
    zeros: int
    total: int
    heads: dict[str, list[int]] = field(default_factory=dict)  # layer -> pruned heads

    def __str__(self) -> str:
        text = f"pruned ({self.structure}): {self.zeros:,} of {self.total:,} weights are zero ({self.sparsity:.1%})"
        if self.heads:
            text += f"; {sum(map(len, self.heads.values()))} heads in {len(self.heads)} layers"
        return text


@torch.no_grad()
def prune(
    model,
    sparsity: Optional[float] = None,
    heads_per_layer: Optional[int] = None,
    score: str = "merged",
    adapter_name: Optional[str] = None,
):
    """Merge the adapter, then prune the adapted layers' weights. Returns (pruned base model, PruneReport).

    Args:
        sparsity: unstructured pruning: this fraction of the adapted layers' weights, pooled over all
            of them, is set to zero, the smallest by `score` first.
        heads_per_layer: structured pruning: in every layer, this many attention heads with the
            smallest update are removed (their block of the output projection's input columns is zeroed).
            A head's importance is DSEE's: the summed |ΔW| over its output-projection columns and its
            value-projection rows (with grouped-query attention, those of the key/value head it reads).
        score: "merged" ranks entries by |W + ΔW| (magnitude pruning of the final weights);
            "delta" by |ΔW|, DSEE's `ABS` rule (what fine-tuning changed least goes first).
    """
    if (sparsity is None) == (heads_per_layer is None):
        raise ValueError("pass one of sparsity= (unstructured) or heads_per_layer= (attention heads)")
    if score not in ("merged", "delta"):
        raise ValueError(f"score={score!r}: use 'merged' (|W + ΔW|) or 'delta' (|ΔW|)")
    adapter = adapter_name or model.active_adapter
    layers = adapter_layers(model, adapter)
    if not layers:
        raise ValueError(f"the model has no layers with adapter {adapter!r} to prune")
    if sparsity is not None and not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r} must be in (0, 1)")
    # Deltas are views on the adapter's tensors, which they keep alive past the merge: a dense ΔW is
    # built for one layer at a time, when needed, never for all of them at once.
    deltas = {n: m.get_delta(adapter) for n, m in layers.items()}
    bases = {n: m.get_base_layer() for n, m in layers.items()}
    if heads_per_layer is not None:
        heads = _heads_to_prune(model, layers, deltas, heads_per_layer)
    model = model.merge_and_unload(adapter_names=[adapter])
    # the merged weights, now W + ΔW, in (out × in) through each layer's own view (Conv1D stores in × out)
    weights = {n: layers[n]._as_2d(bases[n].weight.data) for n in layers}

    if sparsity is not None:
        def scores(n):
            # contiguous: a Conv1D weight is seen through a transposed view, and the masks below are
            # indexed in row-major order
            return (deltas[n].dense(torch.float32) if score == "delta" else weights[n].float()).abs().contiguous()

        k = int(sparsity * sum(w.numel() for w in weights.values()))
        if k:
            cut, below = _kth_smallest(scores, list(weights), k)
            budget = k - below  # entries equal to the cut that go too: the first ones, layer by layer
            for n in weights:
                s = scores(n)
                drop = s < cut
                if budget:
                    at = (s == cut).reshape(-1).nonzero().squeeze(1)[:budget]
                    drop.view(-1)[at] = True
                    budget -= at.numel()
                weights[n][drop.to(weights[n].device)] = 0
        return model, _report("unstructured", weights.values())
    for n, cols in heads.items():
        weights[n][:, cols.to(weights[n].device)] = 0
    head_dim = architectures.head_dim(_model_config(model))
    pruned = {n: sorted(set((cols // head_dim).tolist())) for n, cols in heads.items()}
    return model, _report("heads", [weights[n] for n in heads], pruned)


def _kth_smallest(scores, names: list[str], k: int) -> tuple[torch.Tensor, int]:
    """The k-th smallest (1-based) of all layers' scores, and how many scores lie strictly below it.

    `scores(name)` gives one layer's non-negative float32 scores; layers are visited one at a time, so
    memory is one layer's scores, not all of them (a pooled copy of a 7B model's would be 28 GB).
    Radix selection on the float32 bit patterns, which order non-negative floats as integers: four
    passes, each a 256-bucket histogram of the next byte among the entries that match the bytes fixed
    so far. Exact, ties included.
    """
    prefix, below = 0, 0
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for n in names:
            bits = scores(n).reshape(-1).view(torch.int32)
            if shift < 24:
                bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
            counts += torch.bincount((bits >> shift) & 255, minlength=256).cpu()
        cumulative = counts.cumsum(0)
        byte = int(torch.searchsorted(cumulative, k - below))
        below += int(cumulative[byte - 1]) if byte else 0
        prefix |= byte << shift
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32)[0], below


def _model_config(model) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else dict(config or {})


def _heads_to_prune(model, layers: dict, deltas: dict, per_layer: int) -> dict[str, torch.Tensor]:
    """{output projection name: the input columns of its least important heads}."""
    config = _model_config(model)
    roles = architectures.roles_for(config)
    head_dim = architectures.head_dim(config)
    outputs = [n for n in layers if n.endswith("." + roles.attention_output)]
    if not outputs:
        raise ValueError(f"pruning heads needs the attention output projections ({roles.attention_output}) among the "
                         "adapter's target_modules")
    n_heads = config.get("num_attention_heads") or config.get("n_head")
    n_kv = config.get("num_key_value_heads") or n_heads
    if not 0 < per_layer < n_heads:
        raise ValueError(f"heads_per_layer={per_layer} must be between 1 and {n_heads - 1}")
    chosen = {}
    for name in outputs:
        out = deltas[name].dense(torch.float32).abs()
        importance = out.reshape(out.shape[0], n_heads, head_dim).sum(dim=(0, 2))
        value = name[: -len(roles.attention_output)] + roles.value if roles.value else None
        if value in deltas:
            per_kv = deltas[value].dense(torch.float32).abs().reshape(n_kv, head_dim, -1).sum(dim=(1, 2))
            importance = importance + per_kv[torch.arange(n_heads) // (n_heads // n_kv)]
        heads = torch.topk(importance, per_layer, largest=False).indices.sort().values
        chosen[name] = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return chosen


def _report(structure, weights, heads=None) -> PruneReport:
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return PruneReport(structure, zeros / max(total, 1), zeros, total, heads or {})
