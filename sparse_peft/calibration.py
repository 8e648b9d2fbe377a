"""Supports chosen from data: a short pass over training batches records each adapted layer's input.

    model = get_peft_model(base, SparseConfig(method="s2ft", selection="small_activation"))
    sparse_peft.calibrate(model, batches)      # a few batches of training data; forward passes only

The activation rules of `selection.py` score an input feature by its norm over these batches
(S²FT's S²FT-A, and with the weight S²FT-S / Wanda). Until calibrated, such an adapter refuses to
train: its support is a placeholder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch

from .selection import ACTIVATION_RULES


@torch.no_grad()
def calibrate(model, batches: Iterable, adapter_name: Optional[str] = None, progress: bool = True) -> int:
    """Record the norm of every adapted layer's input features over `batches`, then choose the supports.

    Args:
        model: the PEFT model.
        batches: dicts of model inputs (as a DataLoader gives them) or input tensors.
        adapter_name: defaults to the active adapter.
        progress: show a progress bar.

    Returns the number of tokens seen.
    """
    from tqdm.auto import tqdm

    from .layer import Conv2d
    from .schedule import _find

    model, layers = _find(model)
    adapter = adapter_name or model.active_adapter
    config = model.peft_config[adapter]
    if config.selection not in ACTIVATION_RULES:
        raise ValueError(f"adapter {adapter!r} uses selection={config.selection!r}, which needs no calibration")
    layers = {n: m for n, m in layers.items() if adapter in m._all_available_adapter_names()}
    if any(isinstance(m, Conv2d) for m in layers.values()):
        raise ValueError("calibration scores input features of linear layers; this adapter also targets Conv2d layers")
    sums = {name: torch.zeros(m.delta_shape[1]) for name, m in layers.items()}
    tokens = 0

    def recorder(name):
        def hook(module, args):
            x = args[0].detach()
            sums[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).cpu()

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            if isinstance(batch, Mapping):
                model(**batch)
                tokens += int(next(iter(batch.values())).numel())
            else:
                model(batch)
                tokens += int(batch.numel())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("calibrate got no batches")
    tuner = model.base_model
    for name, layer in layers.items():
        layer.calibrate_support(adapter, config, name, sums[name].sqrt(), group=tuner._head_size(config, name))
    return tokens
