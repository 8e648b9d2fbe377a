"""Full tensors of a layer outside forward, whatever engine holds them.

Per-step work (regrowth, penalties, noise, freezing) reads and writes a layer's tensors between
optimizer steps: values, their gradients, their optimizer state, the base weight. Under plain
training and DDP these are ordinary tensors. Under FSDP2 (`fully_shard`) every parameter, its
gradient and its optimizer state are DTensors sharded along dim 0 outside forward: reading one
gathers the full tensor, writing one keeps this rank's shard of the new full value (every rank
computes the same full value, so no communication is needed). Index buffers are never sharded.

FSDP1 (flat parameters) and DeepSpeed ZeRO-3 (parameters empty until gathered) are not supported
by the per-step work yet: `check_engine` refuses them with the way out (FSDP2).
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed
    DTensor, distribute_tensor = (), None


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def full(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor (gathered from its shards under FSDP2), detached; None stays None."""
    if tensor is None:
        return None
    if is_sharded(tensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


def _sharded_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full `value` laid out as `like` is: its dtype, and under FSDP2 this rank's shard of it (every rank
    holds the same full value, so nothing is communicated)."""
    value = value.to(like.dtype)
    if is_sharded(like):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


@torch.no_grad()
def write_(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """tensor[...] = value, where value is the full tensor; under FSDP2 this rank keeps its shard of it."""
    if is_sharded(tensor):
        tensor.to_local().copy_(_sharded_like(value, tensor).to_local())
    else:
        tensor.copy_(_sharded_like(value, tensor))


@torch.no_grad()
def add_grad_(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (the full gradient), creating the gradient where there is none."""
    grad = _sharded_like(grad, param)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def check_engine(model) -> None:
    """Refuse, with the way out, engines whose parameters the per-step work cannot read outside forward."""
    flattened = any(getattr(param, "_fsdp_flattened", False) for param in model.parameters())  # FSDP1 marks them
    if flattened or any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise ValueError(
            "this adapter's method has work between optimizer steps, which FSDP1's flat parameters do not "
            "support: use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2)"
        )
    if any(hasattr(param, "ds_id") for param in model.parameters()):
        raise ValueError(
            "this adapter's method has work between optimizer steps, which DeepSpeed ZeRO-3's partitioned "
            "parameters do not support yet: use FSDP2 (accelerate: fsdp_version: 2), or ZeRO-2"
        )
