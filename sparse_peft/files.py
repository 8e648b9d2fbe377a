"""Checks on adapter files before anything touches the model.

PEFT reads adapter_model.safetensors and hands us the tensors (in `SparseModel`'s load hook)
before it loads them into the model. Here every sparse tensor is checked against the layer it is
meant for (names, dtypes, shapes, index ranges, order, finiteness) and only then are the layers
given the shapes the file holds (a support's size can differ from the one a fresh config picks,
e.g. after progressive selection). Nothing in a file is trusted.
"""

from __future__ import annotations

import warnings
import zlib

import torch
import torch.nn as nn

from .delta import FROZEN_NAMES, FROZEN_SLOTS, FROZEN_VALUES, INDEX_NAMES, INDICES, PARAMETER_NAMES, VALUES, check_stored
from .layer import SparseLayer, adapter_layers


KNOWN = set(PARAMETER_NAMES) | set(INDEX_NAMES) | set(FROZEN_NAMES)
# In files, frozen slots (SaRA's progressive step) are one bit per value, and their values sit in
# `sparse_values` itself: 1/8 byte per entry instead of an int32 slot and a second value.
FROZEN_MASK = "sparse_frozen_mask"
# Per layer, only in files: the shape of the weight the adapter was trained on (in-range indices do not
# prove the fit: a hidden-64 adapter's flat indices are all in range of a hidden-128 weight), and for
# supports regenerated from the seed, a CRC-32 of the indices (an edited seed draws others).
WEIGHT_SHAPE, SUPPORT_CRC = "sparse_weight_shape", "sparse_support_crc"
RECORDS = (WEIGHT_SHAPE, SUPPORT_CRC)
_PEFT_PREFIX = "base_model.model."


def support_crc(indices: torch.Tensor) -> torch.Tensor:
    """CRC-32 of a support's positions as int64 little-endian, whatever dtype and device hold them."""
    data = indices.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return torch.tensor([zlib.crc32(data)], dtype=torch.int64)


def add_layer_records(model: nn.Module, adapter_name: str, state_dict: dict, regenerated: bool) -> dict:
    """The file's per-layer records (`WEIGHT_SHAPE`, and `SUPPORT_CRC` where the indices are not stored),
    keyed like the layer's other tensors (`<layer>.<record>.<adapter>`) so PEFT strips the adapter name."""
    out = dict(state_dict)
    for name, layer in adapter_layers(model, adapter_name).items():
        name = name.replace("_fsdp_wrapped_module.", "")
        out[f"{name}.{WEIGHT_SHAPE}.{adapter_name}"] = torch.tensor(layer.weight_shape, dtype=torch.int64)
        if regenerated and adapter_name in layer.sparse_indices:
            out[f"{name}.{SUPPORT_CRC}.{adapter_name}"] = support_crc(layer.sparse_indices[adapter_name])
    return out


def pop_layer_records(state_dict: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Take the per-layer records out of a file's tensors: {layer name without PEFT's prefix: {record: tensor}}."""
    records: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in state_dict if any(f".{r}" in k for r in RECORDS)]:
        for record in RECORDS:
            layer, found, rest = key.rpartition(f".{record}")
            if found and rest.count(".") <= 1:  # "" in files, ".<adapter>" as the model names it
                records.setdefault(layer.removeprefix(_PEFT_PREFIX), {})[record] = state_dict.pop(key)
                break
    return records


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


def check_and_fit(
    model: nn.Module, adapter_name: str, state_dict: dict, prefix: str, config=None, records: dict | None = None
) -> None:
    """Validate an adapter's state dict (keys as the model names them) and size the layers to it.

    `records` are the file's per-layer records (`pop_layer_records`); files written before they existed
    have none, and are checked without them (with a warning). Supports regenerated from the seed are
    added to `state_dict`, so the load reports no missing keys for them.

    Raises ValueError naming the first problem; the model is not modified in that case.
    """
    layers = adapter_layers(model, adapter_name)
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
    _check_records(layers, adapter_name, records or {}, regenerated, config)
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
        for attr in regenerated:  # loaded as they are: PEFT then counts no missing key for them
            state_dict[f"{name}.{attr}.{adapter_name}"] = getattr(layer, attr)[adapter_name]
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


def _check_records(layers: dict, adapter_name: str, records: dict, regenerated: set, config) -> None:
    """Each layer's weight shape (and regenerated support) against the file's records."""
    where = "the adapter was trained on another base model"
    base = getattr(config, "base_model_name_or_path", None)
    if base:
        where += f" (its adapter_config.json names {base!r}); load it into that model"
    if not records:
        warnings.warn(
            "this adapter file has no weight-shape records (an earlier sparse_peft release saved it): its fit to this base "
            "model is checked by index ranges only; save it again with this version to record the shapes",
            stacklevel=6,
        )
        return
    for name, layer in layers.items():
        record = records.get(name.removeprefix(_PEFT_PREFIX))
        shape = None if record is None else record.get(WEIGHT_SHAPE)
        if shape is None or shape.dtype != torch.int64 or shape.dim() != 1 or not 2 <= shape.numel() <= 5:
            raise ValueError(f"{name}: {WEIGHT_SHAPE} is missing or malformed in the adapter file; the file is corrupt")
        if tuple(shape.tolist()) != tuple(layer.weight_shape):
            raise ValueError(
                f"{name}: the adapter was trained on a weight of shape {tuple(shape.tolist())}, but this model's is "
                f"{tuple(layer.weight_shape)}; {where}"
            )
        if INDICES in regenerated and adapter_name in layer.sparse_indices:
            crc = record.get(SUPPORT_CRC)
            if crc is None or crc.dtype != torch.int64 or crc.numel() != 1:
                raise ValueError(f"{name}: {SUPPORT_CRC} is missing or malformed in the adapter file; the file is corrupt")
            if int(crc) != int(support_crc(layer.sparse_indices[adapter_name])):
                raise ValueError(
                    f"{name}: the support regenerated from seed={getattr(config, 'seed', None)!r} is not the one this "
                    "adapter was trained with (checksums differ): adapter_config.json's `seed` was changed, or the "
                    "module names differ from the training run's; restore the original seed"
                )
