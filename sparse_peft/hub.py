"""Checks on adapter files before anything touches the model.

PEFT reads adapter_model.safetensors and hands us the tensors (in `SparseModel`'s load hook)
before it loads them into the model. Here every sparse tensor is checked against the layer it is
meant for (names, dtypes, shapes, index ranges, order, finiteness) and only then are the layers
given the shapes the file holds (a support's size can differ from the one a fresh config picks,
e.g. after progressive selection). Nothing in a file is trusted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .delta import FROZEN_NAMES, FROZEN_SLOTS, FROZEN_VALUES, INDEX_NAMES, INDICES, PARAMETER_NAMES, VALUES, check_stored


KNOWN = set(PARAMETER_NAMES) | set(INDEX_NAMES) | set(FROZEN_NAMES)
# In files, frozen slots (SaRA's progressive step) are one bit per value, and their values sit in
# `sparse_values` itself: 1/8 byte per entry instead of an int32 slot and a second value.
FROZEN_MASK = "sparse_frozen_mask"


def _siblings(key: str, attr: str):
    """For `<layer>.<attr><suffix>` (suffix: "" or ".<adapter name>"): a function naming `<layer>.<other><suffix>`."""
    layer, _, suffix = key.rpartition("." + attr)
    return lambda other: f"{layer}.{other}{suffix}"


def pack_frozen(state_dict: dict) -> dict:
    """The state as the model holds it (frozen slots as int32 positions plus their values) -> as files hold it."""
    out = dict(state_dict)
    for key in state_dict:
        if "." + FROZEN_SLOTS not in key:  # keys end in the attribute, or in the attribute and the adapter name
            continue
        name = _siblings(key, FROZEN_SLOTS)
        slots = out.pop(key).long()
        values = out[name(VALUES)].clone()
        values[slots] = out.pop(name(FROZEN_VALUES)).to(values.dtype)
        bits = torch.zeros(-(-values.numel() // 8) * 8, dtype=torch.uint8, device=values.device)
        bits[slots] = 1
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
        out[name(VALUES)] = values
        out[name(FROZEN_MASK)] = (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return out


def unpack_frozen(state_dict: dict) -> dict:
    """The inverse of `pack_frozen`, checking the mask. Files in the older layout (slots and values) pass unchanged."""
    out = dict(state_dict)
    for key in state_dict:
        if "." + FROZEN_MASK not in key:
            continue
        name = _siblings(key, FROZEN_MASK)
        layer = key.rpartition("." + FROZEN_MASK)[0]
        mask, values = out.pop(key), out.get(name(VALUES))
        if values is None:
            raise ValueError(f"{layer}: {FROZEN_MASK} without {VALUES}; the file is corrupt")
        n = values.numel()
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != -(-n // 8):
            raise ValueError(f"{layer}: {FROZEN_MASK} must be {-(-n // 8)} uint8 bytes (one bit per value), "
                             f"not {mask.dtype} of shape {tuple(mask.shape)}; the file is corrupt")
        bits = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1).reshape(-1)
        if bits[n:].any():
            raise ValueError(f"{layer}: {FROZEN_MASK} marks slots past the {n} values; the file is corrupt")
        slots = torch.nonzero(bits[:n]).squeeze(1)
        values = values.clone()
        out[name(FROZEN_VALUES)] = values[slots]
        values[slots] = 0  # the trainable tensor holds zeros at frozen slots (see Delta.effective_values)
        out[name(VALUES)] = values
        out[name(FROZEN_SLOTS)] = slots.to(torch.int32)
    return out


def _split(state_dict, layer_names, prefix):
    """{layer name: {tensor name: tensor}} for every key of ours, and the keys that match no layer."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        if f".{prefix}" not in key:
            continue  # not ours: modules_to_save, biases, trainable tokens
        layer, _, rest = key.rpartition(f".{prefix}")
        attr = prefix + rest.split(".")[0]
        if layer in layer_names and attr in KNOWN:
            per_layer.setdefault(layer, {})[attr] = tensor
        else:
            unexpected.append(key)
    return per_layer, unexpected


def add_optional_buffers(model: nn.Module, adapter_name: str, state_dict: dict, prefix: str) -> None:
    """Empty placeholders for the frozen-slot buffers a file holds and a fresh layer lacks (SaRA after
    its progressive step); `check_and_fit` validates them and gives them their shapes."""
    from .layer import SparseLayer

    modules = dict(model.named_modules())
    for key in state_dict:
        layer_name, _, rest = key.rpartition(f".{prefix}")
        attr = prefix + rest.split(".")[0]
        layer = modules.get(layer_name)
        if attr in FROZEN_NAMES and isinstance(layer, SparseLayer) and adapter_name in layer.sparse_values:
            store = getattr(layer, attr)
            if adapter_name not in store:
                dtype = torch.int32 if attr == FROZEN_SLOTS else layer.sparse_values[adapter_name].dtype
                store[adapter_name] = torch.zeros(0, dtype=dtype, device=layer.sparse_values[adapter_name].device)


def check_and_fit(model: nn.Module, adapter_name: str, state_dict: dict, prefix: str, config=None) -> None:
    """Validate an adapter's state dict (keys as the model names them) and size the layers to it.

    Raises ValueError naming the first problem; the model is not modified in that case.
    """
    from .layer import SparseLayer

    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, SparseLayer) and adapter_name in m._all_available_adapter_names()
    }
    per_layer, unexpected = _split(state_dict, set(layers), prefix)
    where = "the adapter was saved for another base model, with other target_modules, or the file is corrupt"
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        raise ValueError(f"adapter file has tensors for layers this model does not adapt ({shown}); {where}")
    missing = [name for name in layers if name not in per_layer]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"adapter file has no tensors for {len(missing)} adapted layer(s) ({shown}); {where}")

    # indices a config regenerates from its seed are not in the file (SLTrain); frozen slots may be (SaRA)
    regenerated = {INDICES} if config is not None and getattr(config, "store_indices", True) is False else set()
    for name, layer in layers.items():
        tensors = per_layer[name]
        expected = {attr for attr in KNOWN if adapter_name in getattr(layer, attr)} - regenerated
        if set(tensors) != expected:
            raise ValueError(
                f"{name}: the adapter file holds {sorted(tensors)} but its config asks for {sorted(expected)}; {where}"
            )
        stored = dict(tensors)
        for attr in regenerated:
            stored[attr] = getattr(layer, attr)[adapter_name]
        check_stored(name, stored, *layer.delta_shape)

    # Every check passed: give each layer the shapes in the file, so load_state_dict can fill them.
    for name, layer in layers.items():
        layer.sparse_uncalibrated.pop(adapter_name, None)  # the file's support is the chosen one
        for attr, tensor in per_layer[name].items():
            store = getattr(layer, attr)
            current = store[adapter_name]
            if current.shape == tensor.shape:
                continue
            if attr in INDEX_NAMES or attr in FROZEN_NAMES:
                store[adapter_name] = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
            else:
                store[adapter_name] = nn.Parameter(
                    torch.empty(tensor.shape, dtype=current.dtype, device=current.device),
                    requires_grad=current.requires_grad,
                )


# -- model card -------------------------------------------------------------------------------------
_BEGIN, _END = "<!-- sparse_peft:begin -->", "<!-- sparse_peft:end -->"


def model_card_section(peft_model) -> str:
    """What a reader of the Hub page needs: the method, its budget, and how to load the adapter."""
    from .layer import SparseLayer
    from .methods import METHODS
    from .version import __version__

    lines = [_BEGIN, "## Sparse adapter (sparse_peft)", ""]
    for name, config in peft_model.peft_config.items():
        if getattr(config, "peft_type", None) != "SPARSE":
            continue
        method = METHODS.get(config.method)
        title = f"{method.title} ([paper]({method.paper}))" if method else "custom (general fields only)"
        layers = [m for m in peft_model.modules() if isinstance(m, SparseLayer) and name in m._all_available_adapter_names()]
        trainable = sum(d.num_trainable() for d in (m.get_delta(name) for m in layers) if d is not None)
        budget = f"density {config.density:g}" if config.equivalent_rank is None else f"LoRA-rank parity r={config.equivalent_rank}"
        lines += [
            f"- adapter `{name}`: {title}",
            f"  - structure `{config.structure}`, {budget}, selection `{config.selection}`"
            + (f", low-rank r={config.r}" if config.r else "")
            + (f", regrowth every {config.reselection_steps} steps ({config.regrowth})" if config.reselection_steps else ""),
            f"  - {len(layers)} adapted layers, {trainable:,} trainable parameters",
        ]
        extras = [
            f"entries with |w| < {config.threshold:g}" if getattr(config, "threshold", None) is not None else "",
            f"nuclear-norm penalty λ={config.nuclear_norm_weight:g}" if getattr(config, "nuclear_norm_weight", 0) else "",
            f"progressive step at {config.progressive_step:g}" if getattr(config, "progressive_step", None) else "",
            f"GGPO perturbation σ={config.perturbation_sigma:g}, β={config.perturbation_beta:g}"
            if getattr(config, "perturbation", "none") == "ggpo" else "",
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
    import os

    path = os.path.join(output_dir, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if _BEGIN in text and _END in text:
        head, _, rest = text.partition(_BEGIN)
        text = head + rest.partition(_END)[2].lstrip("\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n\n" + model_card_section(peft_model) + "\n")
