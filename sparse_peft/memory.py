"""Measuring training memory: the bytes autograd saves for backward, and the true peak of a block.

Two counters:

- `saved_tensors`: what autograd keeps for backward from a forward pass, counted exactly on any
  device. It is the part of training memory an adapter's design decides, but not all of it: the
  transient buffers a step builds and drops (a scratch copy of a weight, a block of a dense weight
  gradient, an optimizer's temporaries) are not saved for backward and do not show in it.
- `peak_memory`: the most bytes that tensors allocated inside the block held at once, whatever
  they were for (activations, gradients, transients, optimizer state), on top of what existed
  before the block. On CUDA it reads the caching allocator's peak; on a CPU it replays the
  allocation events that torch's profiler records (`profile_memory=True`).

    with saved_tensors(model) as saved:
        loss = model(**batch).loss
    print(saved.bytes)

    with peak_memory() as peak:                    # one whole training step
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    print(peak.bytes)
"""

from __future__ import annotations

from typing import Optional, Union

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


def allocation_peak(events) -> tuple[int, int]:
    """(peak, end) of the bytes held by allocations made within a sequence of events.

    `events` are (pointer, signed bytes) in the order they happened: bytes > 0 an allocation at
    `pointer`, bytes < 0 a free. The running sum only counts what was allocated within the
    sequence: a free of memory allocated before it (at a pointer not allocated since) is left out,
    as is a second free of one pointer. `end` is what was still held after the last event.
    """
    live: dict[int, int] = {}
    held = peak = 0
    for ptr, nbytes in events:
        if nbytes > 0:
            held += nbytes - live.get(ptr, 0)  # a pointer allocated twice without a free seen: count it once
            live[ptr] = nbytes
            peak = max(peak, held)
        elif nbytes < 0 and ptr in live:
            held -= live.pop(ptr)
    return peak, held


def _profiler_events(prof, device_type: str) -> list[tuple[int, int]]:
    """(pointer, signed bytes) of every allocation and free on `device_type` that `prof` recorded, in time order."""
    found = []
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:  # depth first, in the tree's order: each thread's events come in the order they happened
        event = stack.pop()
        stack.extend(reversed(event.children))
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == device_type:
            found.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    found.sort(key=lambda e: e[0])  # stable: events of one nanosecond keep the tree's order
    return [(ptr, size) for _, ptr, size in found]


class peak_memory:
    """The peak of the memory allocated inside the block, in bytes, beyond what was held before it.

    `bytes` is the most that tensors created inside the block held at one time (tensors that
    existed before, e.g. frozen weights, are not counted, and freeing one of them does not lower
    the count); `end_bytes` is what of it was still held when the block ended (e.g. gradients,
    or optimizer state created by a first step). Both are set when the block ends.

    device "cpu" (the default): torch's profiler with `profile_memory=True` records every
    allocation and free of torch's CPU allocator with its exact size in bytes; the peak is the
    largest running sum of those made inside the block. It sees every tensor, including those an
    op builds and drops internally, but not memory a library takes from outside torch's allocator
    (e.g. a BLAS or oneDNN workspace). The profiler slows the block down: do not time it. One
    profiler runs at a time, so CPU blocks do not nest (nor run inside another torch.profiler);
    freeing a tensor from before the block makes torch log that it cannot size that free, harmlessly.

    device "cuda": `torch.cuda.max_memory_allocated` minus `memory_allocated` at entry (the
    caching allocator's counts, in its rounded block sizes; the peak statistics are reset on entry).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.bytes = 0
        self.end_bytes = 0
        self._prof = None
        self._start = 0

    def __enter__(self) -> "peak_memory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        else:
            raise ValueError(f"peak_memory measures cpu and cuda devices, not {self.device.type!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return
        prof, self._prof = self._prof, None
        prof.__exit__(*exc)
        if exc[0] is None:
            self.bytes, self.end_bytes = allocation_peak(_profiler_events(prof, "cpu"))
