"""The saved-for-backward counter the quickstart and the benchmark report."""

from __future__ import annotations

import torch

from sparse_peft.measure import saved_tensors


def test_counts_each_storage_once_and_leaves_the_modules_tensors_out():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    with saved_tensors(layer) as frozen:
        layer.requires_grad_(False)(x).sum()
    assert frozen.bytes == 0  # a frozen linear keeps only its weight, which is the module's own

    layer.requires_grad_(True)
    with saved_tensors(layer) as saved:
        h = layer(x)
        (h * h[:, :2].sum(1, keepdim=True)).sum()  # h is saved twice (and a view of it once): one storage
    assert saved.bytes == x.numel() * 4 + h.numel() * 4 + 5 * 1 * 4
