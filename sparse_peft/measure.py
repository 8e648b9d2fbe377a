"""Measuring what training keeps in memory: the bytes autograd saves for backward.

On a CPU there is no allocator peak to read, and process RSS moves in coarse steps; what is saved
for backward is the part of training memory that an adapter's design decides, and it can be
counted exactly on any device:

    with saved_tensors(model) as saved:
        loss = model(**batch).loss
    print(saved.bytes)
"""

from __future__ import annotations

from typing import Optional

import torch


class saved_tensors:
    """Counts the distinct storages autograd keeps for backward inside the block.

    A view pins its whole storage, so storages are what is counted, each once. The parameters and
    buffers of `module` are left out: a saved reference to them costs nothing, they are held anyway.
    """

    def __init__(self, module: Optional[torch.nn.Module] = None):
        tensors = [*module.parameters(), *module.buffers()] if module is not None else []
        self._exclude = {t.untyped_storage().data_ptr() for t in tensors}
        self._storages: dict[int, torch.UntypedStorage] = {}  # held, so no address is freed and reused meanwhile
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.bytes = 0  # set when the block ends

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._exclude:
                self._storages[storage.data_ptr()] = storage
        return t

    def __enter__(self) -> "saved_tensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        # count now and let go: holding the storages any longer would keep them alive past backward
        self.bytes = sum(s.nbytes() for s in self._storages.values())
        self._storages.clear()
