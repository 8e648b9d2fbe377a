"""The memory counters the quickstart and the benchmarks report: saved for backward, and the true peak."""

from __future__ import annotations

import pytest
import torch

from sparse_peft.memory import allocation_peak, peak_memory, saved_tensors

MiB = 2**20


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


def test_allocation_peak_replays_a_sequence():
    # alloc a (10) and b (5) at once, free a, alloc c (20) at a's old address, free a pointer from before
    events = [(1, 10), (2, 5), (1, -10), (1, 20), (99, -1000), (2, -5)]
    assert allocation_peak(events) == (25, 20)
    assert allocation_peak([]) == (0, 0)
    assert allocation_peak([(1, 8), (1, -8), (1, -8)]) == (8, 0)  # a second free of one pointer counts once


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _inner():
    t = _alloc(2 * MiB)
    t.fill_(1)
    return int(t[0])  # t is freed on return


def _outer():
    t = _alloc(1 * MiB)
    _inner()  # 2 MiB more while t lives
    del t
    _alloc(512 * 1024)  # alone: below the peak


def test_peak_of_nested_allocations_is_exact():
    with peak_memory() as peak:
        _outer()
    assert peak.bytes == 3 * MiB
    assert peak.end_bytes == 0


def test_two_tensors_at_once_against_one_at_a_time():
    def together():
        a, b = _alloc(MiB), _alloc(MiB)
        return a, b

    def in_turn():
        for _ in range(2):
            _alloc(MiB)

    with peak_memory() as both:
        together()
    with peak_memory() as turns:
        in_turn()
    assert both.bytes == 2 * MiB
    assert turns.bytes == MiB


def test_what_existed_before_is_left_out():
    before = [_alloc(4 * MiB)]
    with peak_memory() as peak:
        before.clear()  # freeing it does not lower the count below zero ...
        kept = _alloc(MiB)  # ... and what is still held at the end is reported
    assert peak.bytes == MiB and peak.end_bytes == MiB
    del kept


def test_a_training_step_counts_activations_gradients_and_transients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(16, 64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with peak_memory() as peak:
        y = layer(x)  # 16 × 32 floats
        y.pow(2).sum().backward()  # dW: 32 × 64 floats, kept past the block
        opt.step()
        del y
    grad = 32 * 64 * 4
    assert peak.end_bytes == grad
    assert peak.bytes >= 16 * 32 * 4 + grad  # y and dW were held together
    assert peak.bytes < 16 * 32 * 4 * 4 + grad  # and not much else: y, its square, dy and a scalar or two


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak():
    before = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    with peak_memory("cuda") as peak:
        a = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        del a
        b = torch.empty(MiB, dtype=torch.uint8, device="cuda")
    assert peak.bytes == 2 * MiB and peak.end_bytes == MiB
    del before, b


def test_other_devices_are_refused():
    with pytest.raises(ValueError, match="cpu and cuda"):
        with peak_memory("meta"):
            pass
