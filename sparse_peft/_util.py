"""Small helpers shared across the package. Imports nothing of sparse_peft, so anything may import it."""

from __future__ import annotations

import torch


def is_deepspeed_optimizer(optimizer) -> bool:
    """DeepSpeed's ZeRO optimizer (its own torch optimizer steps flat partitions, not the model's tensors)."""
    return (type(optimizer).__module__.startswith("deepspeed.") and not isinstance(optimizer, torch.nn.Module)
            and not isinstance(optimizer, torch.optim.Optimizer))


def unwrap_optimizer(optimizer):
    """The optimizer that steps the adapter's tensors: DeepSpeed's ZeRO optimizer wherever one is behind the
    wrappers (accelerate's, the engine), else the torch optimizer behind accelerate's AcceleratedOptimizer and
    similar wrappers (`.optimizer`)."""
    inner = optimizer
    for _ in range(8):  # accelerate's wrapper is itself a torch.optim.Optimizer: look behind it first
        if inner is None or is_deepspeed_optimizer(inner):
            break
        inner = getattr(inner, "optimizer", None)
    if inner is not None:
        return inner
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def is_sparse_layer(module) -> bool:
    # duck-typed, so that this module needs no import of layer.py
    return hasattr(module, "sparse_values") and hasattr(module, "get_delta")


def _owns(obj, name: str) -> bool:
    return hasattr(type(obj), name) or name in getattr(obj, "__dict__", {})


def find_peft_model(model):
    """The PEFT model behind DDP / accelerate wrappers, and its sparse layers by name."""
    # look the attribute up on the object itself: DeepSpeed's engine forwards unknown attributes to its module,
    # so hasattr(engine, "peft_config") holds while the layer names seen through the engine gain a "module." prefix
    while not _owns(model, "peft_config") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    layers = {name: m for name, m in model.named_modules() if is_sparse_layer(m)}
    return model, layers
