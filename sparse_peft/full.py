"""Full tensors of a layer outside forward, whatever engine holds them.

Per-step work (regrowth, penalties, noise, freezing) reads and writes a layer's tensors between
optimizer steps: values, their gradients, their optimizer state, the base weight. Everything outside
forward goes through this file, so a method never asks which engine it runs under:

- plain training and DDP: ordinary tensors.
- FSDP2 (`fully_shard`): parameters, their gradients and optimizer state are DTensors sharded along
  dim 0. Reading one gathers the whole; writing one keeps this rank's shard of the new whole value
  (every rank computes the same value, so nothing is communicated).
- DeepSpeed ZeRO (stages 1-3): the optimizer owns fp32 master copies, flattened and partitioned over
  the ranks, beside the model's low-precision parameters (under ZeRO-3 those are empty outside
  forward too); gradients live in the optimizer's partitions, not in `.grad`. Reads and writes use
  DeepSpeed's own full-tensor accessors (`deepspeed.utils.safe_get_full_*`), and a write updates both
  the master and the parameter forward uses. They are collectives: every rank calls them.

Index buffers are never sharded by any engine. FSDP1 (flat parameters) is refused (`check_engine`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ._util import is_deepspeed_optimizer, unwrap_optimizer

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed
    DTensor, distribute_tensor = (), None


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def is_deepspeed(tensor) -> bool:
    """A parameter DeepSpeed ZeRO manages: partitioned (stage 3, `ds_id`) or with an fp32 master
    fragment in a ZeRO optimizer (stages 1-2, `_hp_mapping`)."""
    return hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping")


def _has_master(param) -> bool:
    # the ZeRO optimizer exists and trains this parameter (before deepspeed.initialize, or for a frozen
    # weight, ZeRO-3 has only the partitioned parameter itself)
    return param.requires_grad and (hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping"))


@contextlib.contextmanager
def gathered(params, modifier_rank=None):
    """ZeRO-3's partitioned parameters made whole for the block (a collective); anything else as it is."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


_GRAD = object()  # what _zero3_write_ writes when it is not the value or a state key


@torch.no_grad()
def _zero3_write_(param, value: torch.Tensor, what=None) -> None:
    """This rank's partition of a ZeRO-3 parameter's fp32 master (what=None), optimizer state (a key) or
    gradient (_GRAD), from the whole value. DeepSpeed's own setters narrow the unpadded value at the
    padded partition's offset, which fails on the last rank whenever the size does not divide evenly."""
    zero = param._z3_optimizer
    if what is _GRAD:
        part, group = zero._get_fp32_grad_state_partition(param=param, release_swap_buffers=False)
    else:
        part, group = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=what)
    start = part.numel() * zero._get_param_partition_rank(param)
    flat = value.reshape(-1).to(part.dtype)
    n = max(0, min(part.numel(), flat.numel() - start))
    part.view(-1)[:n].copy_(flat[start:start + n])
    if zero._swappable_optimizer_subgroup(group):  # NVMe offload: write the partition back where it lives
        if what is _GRAD:
            zero._writeback_swap_state(group, write_opt_state=False, write_gradients=True)
        else:
            zero._optimizer_states_and_gradient_swap_out(group)


def full(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor, detached (gathered from its shards under FSDP2, DeepSpeed's fp32 master for
    a parameter ZeRO trains, the gathered parameter for one ZeRO-3 partitions); None stays None."""
    if tensor is None:
        return None
    if is_sharded(tensor):
        return tensor.detach().full_tensor()
    if is_deepspeed(tensor):
        if _has_master(tensor):
            from deepspeed.utils import safe_get_full_fp32_param

            return safe_get_full_fp32_param(tensor).detach().reshape(shape_of(tensor))
        with gathered([tensor]):
            return tensor.detach().clone()
    return tensor.detach()


def shape_of(tensor: torch.Tensor) -> torch.Size:
    """The tensor's whole shape (ZeRO-3 keeps it in `ds_shape` while the parameter is empty)."""
    return tensor.ds_shape if hasattr(tensor, "ds_shape") else tensor.shape


def full_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole gradient of a parameter between backward and the optimizer step; None if it has none."""
    if hasattr(param, "ds_id"):
        # the optimizer's reduced fp32 partition: what the step uses (a `.grad` ZeRO-3 may leave on the
        # parameter is dropped unread at the step, and DeepSpeed's safe_get_full_grad would return it)
        return param._z3_optimizer.get_fp32_grad_for_param(param).detach().reshape(shape_of(param))
    if is_deepspeed(param):
        from deepspeed.utils import safe_get_full_grad

        grad = safe_get_full_grad(param)
        return None if grad is None else grad.detach().reshape(shape_of(param))
    return full(param.grad)


def _sharded_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full `value` laid out as `like` is: its dtype, and under FSDP2 this rank's shard of it (every rank
    holds the same full value, so nothing is communicated)."""
    value = value.to(like.dtype)
    if is_sharded(like):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


@torch.no_grad()
def write_(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """tensor[...] = value, where value is the full tensor; under FSDP2 this rank keeps its shard of it,
    under DeepSpeed both the fp32 master and the parameter forward reads take it."""
    if is_sharded(tensor):
        tensor.to_local().copy_(_sharded_like(value, tensor).to_local())
    elif is_deepspeed(tensor):
        if _has_master(tensor) and hasattr(tensor, "ds_id"):
            _zero3_write_(tensor, value)
        elif _has_master(tensor):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(tensor, value.float().reshape(shape_of(tensor)))
        # the low-precision parameter: whole under stages 1-2; under ZeRO-3 gathered, written and
        # partitioned again (rank 0's copy is kept; every rank wrote the same value)
        with gathered([tensor], modifier_rank=0):
            tensor.data.copy_(value.reshape(tensor.shape).to(tensor.dtype))
    else:
        tensor.copy_(_sharded_like(value, tensor))


@torch.no_grad()
def add_grad_(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (the full gradient), creating the gradient where there is none."""
    if is_deepspeed(param):
        _set_grad(param, grad.reshape(shape_of(param)).float() + full_grad(param).float())
        return
    grad = _sharded_like(grad, param)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


@torch.no_grad()
def drop_grad(param: torch.Tensor) -> None:
    """This step does not train `param`: its gradient goes (zeroed where the engine keeps it elsewhere)."""
    if is_deepspeed(param):
        _set_grad(param, torch.zeros(shape_of(param), dtype=torch.float32, device=param.device))
    param.grad = None


def _set_grad(param, value: torch.Tensor) -> None:
    if hasattr(param, "ds_id"):
        _zero3_write_(param, value, _GRAD)
    else:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(param, value)


# -- optimizer state, per element of a parameter ----------------------------------------------------
def state_keys(optimizer, param: torch.Tensor) -> list[str]:
    """The keys of `param`'s per-element optimizer state (Adam's exp_avg, exp_avg_sq, ...); [] before the
    first step."""
    if is_deepspeed(param):
        # every rank's ZeRO optimizer holds the same keys for its own partition (asking the parameter's
        # fragment would not do: a rank may hold none of it, and the reads are collectives all must join)
        inner = getattr(deepspeed_optimizer(optimizer), "optimizer", None)
        state = next(iter(inner.state.values()), {}) if inner is not None else {}
        return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]
    state = optimizer.state.get(param) if optimizer is not None else None
    return [k for k, v in (state or {}).items() if torch.is_tensor(v) and v.shape == param.shape]


def read_state(optimizer, param: torch.Tensor, key: str) -> torch.Tensor:
    """The whole per-element optimizer state `key` of `param`."""
    if is_deepspeed(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key).detach().reshape(shape_of(param))
    return full(optimizer.state[param][key])


def write_state_(optimizer, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
    """optimizer.state[param][key] = value (the whole tensor), whatever engine shards it."""
    if hasattr(param, "ds_id"):
        _zero3_write_(param, value, key)
    elif is_deepspeed(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value.float().reshape(shape_of(param)), key)
    else:
        write_(optimizer.state[param][key], value)


# -- engines ---------------------------------------------------------------------------------------
def deepspeed_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer behind an engine, accelerate's wrapper, or itself; None otherwise."""
    found = unwrap_optimizer(optimizer)
    return found if is_deepspeed_optimizer(found) else None


def check_engine(model) -> None:
    """Refuse, with the way out, engines whose parameters the per-step work cannot read outside forward, and
    quantized bases under an engine that shards them (untested: unsupported)."""
    quantized = any(getattr(m, "quantization_backend", None) is not None for m in model.modules())
    if quantized and any(is_sharded(p) or hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "a quantized base (bitsandbytes 4-/8-bit, QLoRA-style) sharded by FSDP2 or DeepSpeed ZeRO-3 is not supported "
            "by sparse_peft yet (reading, merging and freezing need its whole packed weight): train it under DDP, where "
            "each GPU holds the quantized base whole, or shard a bf16 base with FSDP2 / ZeRO-3"
        )
    flattened = any(getattr(param, "_fsdp_flattened", False) for param in model.parameters())  # FSDP1 marks them
    if flattened or any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise ValueError(
            "this adapter's method has work between optimizer steps, which FSDP1's flat parameters do not "
            "support: use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version: 2)"
        )
