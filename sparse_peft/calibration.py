"""Supports chosen from data: a short pass over training batches scores each adapted layer's inputs.

    model = get_peft_model(base, SparseConfig(method="s2ft", selection="small_activation"))
    sparse_peft.calibrate(model, batches)      # a few batches of training data

The activation rules of `selection.py` score an input feature by its norm over these batches
(S²FT-A, and with the weight S²FT-S / Wanda): forward passes only. The gradient rules (S²FT-G)
score input column c of a weight W by the norm of the loss gradient of that column,
sqrt(Σ_batches ‖∂L_b/∂W[:, c]‖²): each batch also runs a backward of the model's own loss, so the
batches need labels. Until calibrated, such an adapter refuses to train: its support is a
placeholder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
import torch.distributed as dist

from ._util import find_peft_model
from .layer import Conv2d
from .ops import _BLOCK_ELEMENTS
from .selection import CALIBRATION_RULES, GRADIENT_RULES


def calibrate(model, batches: Iterable, adapter_name: Optional[str] = None, progress: bool = True) -> int:
    """Score every adapted layer's input features over `batches`, then choose the supports.

    Args:
        model: the PEFT model.
        batches: dicts of model inputs (as a DataLoader gives them) or input tensors. The gradient
            rules differentiate the model's loss, so they need dicts with labels (for a causal LM,
            input_ids and labels).
        adapter_name: defaults to the active adapter.
        progress: show a progress bar.

    Supports whose size changes (allocation="global") get new parameter tensors: calibrate before
    creating the optimizer. Returns the number of tokens seen.
    """
    statistics, tokens = calibration_statistics(model, batches, adapter_name, progress)
    model = _peft_model(model)
    model.base_model.choose_supports(adapter_name or model.active_adapter, calibration=statistics)
    return tokens


def calibration_statistics(
    model, batches: Iterable, adapter_name: Optional[str] = None, progress: bool = True
) -> tuple[dict[str, torch.Tensor], int]:
    """What `calibrate` scores by, without choosing anything.

    Returns ({module name in the base model: one value per input feature, on the CPU}, tokens seen).
    The values are input-feature norms for the activation rules and gradient-column norms for the
    gradient rules, both of the base model: every adapter is disabled during the pass.
    """
    model = _peft_model(model)
    adapter = adapter_name or model.active_adapter
    config = model.peft_config[adapter]
    if config.selection not in CALIBRATION_RULES:
        raise ValueError(f"adapter {adapter!r} uses selection={config.selection!r}, which needs no calibration")
    # coupled row layers are not scored: they follow their partner's columns
    layers, _ = model.base_model._layers_of(adapter)
    if any(isinstance(m, Conv2d) for m in layers.values()):
        raise ValueError(
            "calibration scores input features of linear layers, and this adapter also targets Conv2d layers: leave "
            "the Conv2d layers out of target_modules, or use a selection rule that needs no data (e.g. 'magnitude')"
        )
    record = _gradient_norms if config.selection in GRADIENT_RULES else _activation_norms
    was_training = model.training
    model.eval()  # no dropout
    try:
        # scored on the base model: a placeholder support (random values when init_weights=False) must
        # not steer the choice towards itself, nor other adapters towards theirs
        with model.disable_adapter():
            squares, tokens = record(model, layers, batches, config.selection, progress)
    finally:
        model.train(was_training)
    squares, tokens = _sum_over_ranks(squares, tokens, layers)
    if tokens == 0:
        raise ValueError("calibrate got no batches")
    missing = [n for n in layers if n not in squares]
    if missing:
        raise ValueError(
            f"the calibration batches never reached {missing[0]} (and {len(missing) - 1} other layers): no input, "
            "or for a gradient rule no gradient of the loss, passed through it: calibrate on batches that run through "
            "every adapted layer (with labels for a gradient rule), or leave that layer out of target_modules"
        )
    return {n: v.sqrt().cpu() for n, v in squares.items()}, tokens


def _sum_over_ranks(squares: dict, tokens: int, layers: dict) -> tuple[dict, int]:
    """Under torch.distributed, add up every rank's sums, so that all ranks choose the same supports
    (DDP averages gradients by position: different supports would silently mix different columns)."""
    if not (dist.is_available() and dist.is_initialized()):
        return squares, tokens
    summed = {}
    for name, layer in layers.items():  # the same order on every rank
        weight = layer.get_base_layer().weight
        local = squares.get(name)
        if local is None:  # this rank saw no batch
            local = torch.zeros(layer.in_features, dtype=_accumulator(weight.dtype), device=weight.device)
        dist.all_reduce(local)
        summed[name] = local
    count = torch.tensor([tokens], dtype=torch.float64, device=next(iter(summed.values())).device)
    dist.all_reduce(count)
    return summed, int(count.item())


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    # float64 models (tests) are scored in float64; everything else in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _peft_model(model):
    return find_peft_model(model)[0]


def _tokens(batch) -> int:
    return int(next(iter(batch.values())).numel()) if isinstance(batch, Mapping) else int(batch.numel())


@torch.no_grad()
def _activation_norms(model, layers, batches, rule, progress):
    from tqdm.auto import tqdm

    sums = {}

    def recorder(name):
        def hook(module, args):
            x = args[0].detach()
            squares = x.reshape(-1, x.shape[-1]).to(_accumulator(x.dtype)).pow(2).sum(0)
            sums[name] = squares if name not in sums else sums[name] + squares

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers.items()]
    tokens = 0
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            if isinstance(batch, Mapping):
                model(**batch)
            else:
                model(batch)
            tokens += _tokens(batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums, tokens


def _gradient_norms(model, layers, batches, rule, progress):
    """Σ_b ‖∂L_b/∂W[:, c]‖² per input column c of every layer, layer by layer during each backward.

    A layer's weight gradient is dyᵀx, from its input x (kept by a forward hook) and the gradient dy
    of its output (a hook on that tensor). It is formed in column blocks, reduced to column norms
    and dropped inside the backward, so no dense gradient outlives its layer's step of the backward
    and nothing lands in any `.grad`. The base weights stay frozen: what makes the activations
    differentiable is the input embeddings' output (as `enable_input_require_grads` does).
    """
    from tqdm.auto import tqdm

    sums, leaves = {}, []

    def recorder(name):
        def hook(module, args, output):
            if not output.requires_grad:
                return  # reported after the backward
            kept = [args[0].detach()]

            def on_grad(dy):
                squares = _column_gradient_squares(dy, kept.pop())  # pop: x is freed with this layer's step
                sums[name] = squares if name not in sums else sums[name] + squares

            output.register_hook(on_grad)

        return hook

    def differentiable(module, args, output):
        if not output.requires_grad:
            output.requires_grad_(True)
        leaves.append(output)

    embeddings = _input_embeddings(model)
    handles = [m.register_forward_hook(recorder(n)) for n, m in layers.items()]
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(differentiable))
    tokens = 0
    try:
        with torch.enable_grad():
            for batch in tqdm(batches, desc="calibrating (gradients)", disable=not progress):
                leaves.clear()
                if not isinstance(batch, Mapping):
                    raise ValueError(_NO_LOSS.format(rule=rule))
                if embeddings is None:  # e.g. a model fed features: differentiate its floating-point inputs
                    batch = {k: v.detach().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v
                             for k, v in batch.items()}
                    leaves.extend(v for v in batch.values() if torch.is_tensor(v) and v.requires_grad)
                output = model(**batch)
                loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
                if loss is None:
                    raise ValueError(_NO_LOSS.format(rule=rule))
                if not leaves:
                    raise ValueError("calibrate found nothing to differentiate: the model has no input embeddings "
                                     "and the batch no floating-point tensor")
                torch.autograd.grad(loss, leaves, allow_unused=True)
                tokens += _tokens(batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums, tokens


_NO_LOSS = (
    "selection={rule!r} scores columns by the gradient of the model's loss, and the model returned none: give "
    "calibrate dicts with labels, e.g. {{'input_ids': ids, 'labels': ids}} for a causal LM"
)


def _input_embeddings(model):
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _column_gradient_squares(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖(dyᵀx)[:, c]‖² for every column c, in blocks of columns so that no out×in temporary is whole."""
    dtype = _accumulator(x.dtype)
    dy = dy.reshape(-1, dy.shape[-1]).to(dtype)
    x = x.reshape(-1, x.shape[-1])
    step = max(1, _BLOCK_ELEMENTS // dy.shape[1])
    return torch.cat([(dy.t() @ x[:, c : c + step].to(dtype)).pow(2).sum(0) for c in range(0, x.shape[1], step)])
