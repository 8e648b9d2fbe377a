"""Small helpers shared across the package. Imports nothing of sparse_peft, so anything may import it."""

from __future__ import annotations

import torch


def unwrap_optimizer(optimizer):
    """The torch optimizer behind accelerate's AcceleratedOptimizer and similar wrappers (`.optimizer`)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def is_sparse_layer(module) -> bool:
    # duck-typed, so that this module needs no import of layer.py
    return hasattr(module, "sparse_values") and hasattr(module, "get_delta")


def find_peft_model(model):
    """The PEFT model behind DDP / accelerate wrappers, and its sparse layers by name."""
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    layers = {name: m for name, m in model.named_modules() if is_sparse_layer(m)}
    return model, layers
