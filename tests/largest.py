"""What the largest tensor formed inside a block was: the check behind "nothing of a weight's size"."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestCreated(TorchDispatchMode):
    """The most elements of any tensor an op returns inside the block, per dtype (`largest`), and that op (`op`).

    Views are left out (they allocate nothing), and so is any tensor on a storage of `owned` (tensors that
    existed before the block, e.g. a model's parameters and buffers, which an op may return in place).
    """

    def __init__(self, owned=()):
        super().__init__()
        self.owned = {t.untyped_storage().data_ptr() for t in owned}
        self.largest: dict[torch.dtype, int] = {}
        self.op: dict[torch.dtype, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t._is_view():
                continue
            if t.untyped_storage().data_ptr() in self.owned:
                continue
            if t.numel() > self.largest.get(t.dtype, 0):
                self.largest[t.dtype], self.op[t.dtype] = t.numel(), func
        return out

    def most(self, floating: bool = True) -> tuple[int, object]:
        """(elements, op) of the largest tensor of any (floating-point) dtype."""
        kept = [d for d in self.largest if d.is_floating_point or not floating]
        return max(((self.largest[d], self.op[d]) for d in kept), default=(0, None), key=lambda pair: pair[0])
