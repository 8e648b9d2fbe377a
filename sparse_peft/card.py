"""The sparse_peft section of an adapter's model card (README.md): the method, its budget, how to load it."""

from __future__ import annotations

import os

from .layer import adapter_layers
from .methods import METHODS
from .version import __version__


_BEGIN, _END = "<!-- sparse_peft:begin -->", "<!-- sparse_peft:end -->"


def model_card_section(peft_model) -> str:
    """What a reader of the Hub page needs: the method, its budget, and how to load the adapter."""
    lines = [_BEGIN, "## Sparse adapter (sparse_peft)", ""]
    for name, config in peft_model.peft_config.items():
        if getattr(config, "peft_type", None) != "SPARSE":
            continue
        method = METHODS.get(config.method)
        title = f"{method.title} ([paper]({method.paper}))" if method else "custom (general fields only)"
        layers = list(adapter_layers(peft_model, name).values())
        trainable = sum(d.num_trainable() for d in (m.get_delta(name) for m in layers) if d is not None)
        budget = f"density {config.density:g}" if config.equivalent_rank is None else f"LoRA-rank parity r={config.equivalent_rank}"
        lines += [
            f"- adapter `{name}`: {title}",
            f"  - structure `{config.structure}`, {budget}, selection `{config.selection}`"
            + (f", low-rank r={config.r}" if config.r else ""),
            f"  - {len(layers)} adapted layers, {trainable:,} trainable parameters",
        ]
        extras = [
            *(method.card_lines(config) if method else []),
            "support regenerated from the seed (no indices stored)" if getattr(config, "store_indices", True) is False else "",
        ]
        if any(extras):
            lines.append("  - " + "; ".join(e for e in extras if e))
        if method:
            lines.append(f"  - please cite the method's paper: {method.paper}")
    base = getattr(getattr(peft_model, "peft_config", {}).get(peft_model.active_adapter), "base_model_name_or_path", None)
    lines += [
        "",
        "Load it (`import sparse_peft` first: it registers the method with PEFT):",
        "",
        "```python",
        "import sparse_peft",
        "from peft import AutoPeftModelForCausalLM",
        f'model = AutoPeftModelForCausalLM.from_pretrained("<this repo>")  # base: {base or "see adapter_config.json"}',
        "merged = model.merge_and_unload()  # plain transformers layers, e.g. for vLLM",
        "```",
        "",
        f"Framework versions: sparse_peft {__version__}.",
        _END,
    ]
    return "\n".join(lines)


def update_model_card(output_dir: str, peft_model) -> None:
    """Add (or refresh) our section in the README.md that PEFT has just written."""
    path = os.path.join(output_dir, "README.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if _BEGIN in text and _END in text:
        head, _, rest = text.partition(_BEGIN)
        text = head + rest.partition(_END)[2].lstrip("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n\n" + model_card_section(peft_model) + "\n")
