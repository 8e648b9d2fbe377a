from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch.nn.modules.module import _global_forward_hooks
from transformers.pytorch_utils import Conv1D

from . import ops
from ._util import unwrap_optimizer
from .full import full, is_deepspeed, is_sharded, read_state, state_keys, write_, write_state_
from .config import SparseConfig
from .delta import (
    COL_BLOCK,
    COL_INDEX,
    FROZEN_NAMES,
    FROZEN_SLOTS,
    FROZEN_VALUES,
    INDEX_NAMES,
    INDEX_OF_STRUCTURE,
    INDICES,
    LORA_A,
    LORA_B,
    PARAMETER_NAMES,
    ROW_BLOCK,
    ROW_INDEX,
    VALUES,
    Delta,
    index_dtype,
)
from .perturbation import perturbed_linear
from .prng import seed_for, seeded_subset
from .selection import NeedsCalibration, module_seed, select



def dequantized_weight(backend, base: nn.Module) -> torch.Tensor:
    """A quantized base layer's weight as a fresh float tensor, in its own layout.

    bitsandbytes (0.50) repacks a 4-bit weight for its CPU kernel on the first inference forward (eval
    mode, no grad): codes in 32-row tiles, absmax as a (blocks × rows) bfloat16 table. Its
    dequantize_4bit (which PEFT's backend calls) misreads that layout and its inverse leaves the absmax
    transposed, so such a weight is decoded here; every other weight goes through the backend.
    """
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return backend.get_base_weight(base)
    packed, (rows, cols) = base.weight.data, state.shape
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, cols // 2) or rows % 32:
        raise ValueError(
            f"cannot read this {backend.backend_name} layer's weight: bitsandbytes packed it for its CPU kernel in a "
            f"layout this version does not know ({tuple(packed.shape)}, {packed.dtype}); merge or choose supports "
            "before any inference forward (bitsandbytes packs in eval mode only), or install bitsandbytes>=0.45,<0.51"
        )
    nibbles = packed.reshape(-1, 32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # 64 codes: 32 rows × 2 columns
    codes = codes.reshape(rows // 32, cols // 2, 32, 2).transpose(1, 2).reshape(rows, cols)
    absmax = state.absmax.float().T.reshape(rows, cols // state.blocksize)
    weight = state.code.float()[codes.long()] * absmax.repeat_interleave(state.blocksize, dim=1)
    return weight.to(getattr(state, "original_dtype", weight.dtype))


# a mixed batch at decoding: an adapter's samples up to this many get their update one by one (matrix-vector
# products into their rows of the output); more share one product over the group, gathered and scattered.
# `python benchmarks/csr_timings.py samples`: two matrix-vector products cost what one CSR product over two tokens
# does (and save the gather and the scatter); over four tokens the one product is clearly cheaper
DECODE_SAMPLES_MAX = 2


class _DecodePlan:
    """What SparseLayer._decoding_delta keeps per adapter: the Delta decode_add reads, and what it was made from
    (every stored tensor of the adapter on the layer, their versions, the two scales) to tell when it is stale.
    A class with slots, checked in one loop: this runs per layer per token, where every allocation shows."""

    __slots__ = ("tensors", "versions", "scaling", "sparse_scale", "delta", "dtype", "device_type")

    def __init__(self, layer: "SparseLayer", name: str):
        self.tensors = _stored(layer, name)
        self.versions = [None if t is None else t._version for t in self.tensors]
        self.scaling, self.sparse_scale = layer.sparse_scaling.get(name, 1.0), layer.sparse_part_scale.get(name, 1.0)
        delta = layer.get_delta(name)
        if delta is not None and delta.frozen_slots is not None and delta.frozen_slots.numel():
            # SaRA after its progressive step: the values with the frozen ones written in, made once per plan
            delta = dataclasses.replace(delta, values=delta.effective_values(scaled=False), frozen_slots=None,
                                        frozen_values=None)
        self.delta = delta if delta is not None and delta.decodes_into() else None
        reference = None if self.delta is None else self.delta.reference
        self.dtype, self.device_type = (None, None) if reference is None else (reference.dtype, reference.device.type)

    def holds(self, layer: "SparseLayer", name: str) -> bool:
        if layer.sparse_scaling.get(name, 1.0) != self.scaling or layer.sparse_part_scale.get(name, 1.0) != self.sparse_scale:
            return False
        modules, i = layer._modules, 0
        for key in PARAMETER_NAMES:
            tensor = modules[key]._parameters.get(name)
            if tensor is not self.tensors[i] or (tensor is not None and tensor._version != self.versions[i]):
                return False
            i += 1
        for key in _BUFFER_NAMES:
            tensor = modules[key]._buffers.get(name)
            if tensor is not self.tensors[i] or (tensor is not None and tensor._version != self.versions[i]):
                return False
            i += 1
        return True


_BUFFER_NAMES = (*INDEX_NAMES, *FROZEN_NAMES)


def _stored(layer: "SparseLayer", name: str) -> list:
    """Every tensor adapter `name` stores on the layer (None where it has none), parameters then buffers."""
    modules = layer._modules
    return ([modules[key]._parameters.get(name) for key in PARAMETER_NAMES]
            + [modules[key]._buffers.get(name) for key in _BUFFER_NAMES])


class SparseLayer(BaseTunerLayer):
    """The state a sparse adapter keeps on one layer, and the PEFT layer contract around it.

    Per adapter name: the trainable tensors in `ParameterDict`s and their indices in persistent
    `BufferDict`s (so PEFT saves, loads, moves and deletes them with no special code). The base
    layer is never changed, except by `merge`. The math lives in `delta.Delta` and `ops`.
    """

    # trainable per-adapter tensors
    adapter_layer_names = PARAMETER_NAMES
    # other per-adapter state: int32 indices (never cast to float, never trained), the low-rank scale,
    # and the gradient probe a regrowth schedule may attach for a few steps (never saved)
    # and SaRA's frozen slots with their values (buffers, saved); the scale of the sparse part (DSEE)
    other_param_names = (
        *INDEX_NAMES, *FROZEN_NAMES, "sparse_scaling", "sparse_part_scale", "sparse_probe", "sparse_uncalibrated",
        "sparse_noise",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        for name in PARAMETER_NAMES:
            setattr(self, name, nn.ParameterDict())
        for name in (*INDEX_NAMES, *FROZEN_NAMES):
            setattr(self, name, BufferDict(persistent=True))
        self.sparse_scaling: dict[str, float] = {}
        self.sparse_part_scale: dict[str, float] = {}
        # LoRA-GGPO: (row std, seed) of the noise on the base weight in training forwards, set by the schedule
        self.sparse_noise: dict[str, tuple[torch.Tensor, int]] = {}
        self.sparse_probe: dict[str, Any] = {}
        # adapters whose support waits for calibration data (activation or gradient rules): they must not train yet
        self.sparse_uncalibrated: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    # -- the weight in linear orientation (out × in) -------------------------------------------
    @property
    def delta_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape as an adapter file records it: (out, in) for linear layers, quantized too."""
        return self.out_features, self.in_features

    def _as_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """A (out × in) view of a weight of the base layer's own layout."""
        return weight

    def _from_2d(self, weight2d: torch.Tensor) -> torch.Tensor:
        return weight2d

    def _base_weight_2d(self) -> torch.Tensor:
        base = self.get_base_layer()
        if self.quantization_backend is None:
            sharded = is_sharded(base.weight) or is_deepspeed(base.weight)
            return self._as_2d(full(base.weight) if sharded else base.weight)
        try:
            return self._as_2d(dequantized_weight(self.quantization_backend, base))
        except (TypeError, NotImplementedError) as err:
            raise ValueError(
                f"this {self.quantization_backend.backend_name} layer cannot give its weights back, which "
                "selection rules that look at the weight and merging need; use selection='random'"
            ) from err

    # -- adding an adapter -----------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        config: SparseConfig,
        module_key: str = "",
        inference_mode: bool = False,
        group: int = 1,
        **kwargs,
    ) -> None:
        """Add an adapter. `group`: columns are chosen in blocks of this many (the head size)."""
        out_features, in_features = self.delta_shape
        seed = module_seed(config.seed, module_key)
        structure = config.structure
        if structure != "none":
            k = config.budget(structure, out_features, in_features, module_key, group)
            exclude = self._taken_by(config.disjoint_from or [], structure)
            own = config.method_impl.choose_support(self, config, module_key, k, exclude)
            if own is not None:
                # the method's own rule (e.g. every entry below a magnitude threshold); its size may differ from k
                support, k = own, own.numel()
            elif not config.store_indices:
                # a support that files do not store, regenerated from the seed on any machine
                support = seeded_subset(out_features * in_features, k, seed_for(config.seed, module_key))
            else:
                try:
                    support = select(
                        config.selection, structure, k, (out_features, in_features), seed, self._base_weight_2d, group,
                        exclude, residual_rank=config.residual_rank,
                    )
                except NeedsCalibration:
                    # a placeholder of the right size until `sparse_peft.calibrate` chooses from activations
                    support = select("random", structure, k, (out_features, in_features), seed, None, group, exclude)
                    self.sparse_uncalibrated[adapter_name] = True
            self.sparse_part_scale[adapter_name] = config.scaling if config.scale_sparse and config.r else 1.0
            if structure == "unstructured":
                self._store(adapter_name, VALUES, (k,), INDICES, support, out_features * in_features)
            elif structure == "rows":
                self._store(adapter_name, ROW_BLOCK, (k, in_features), ROW_INDEX, support, out_features)
            else:
                self._store(adapter_name, COL_BLOCK, (out_features, k), COL_INDEX, support, in_features)
        if config.r > 0:
            self.sparse_lora_A[adapter_name] = nn.Parameter(torch.empty(config.r, in_features))
            self.sparse_lora_B[adapter_name] = nn.Parameter(torch.empty(out_features, config.r))
            self.sparse_scaling[adapter_name] = config.scaling
        self.reset_parameters(adapter_name, config.init_weights, seed)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        self.prepare_layout(adapter_name)

    @torch.no_grad()
    def calibrate_support(
        self,
        adapter_name: str,
        config: SparseConfig,
        module_key: str,
        calibration: Optional[torch.Tensor] = None,
        group: int = 1,
        support: Optional[torch.Tensor] = None,
    ) -> None:
        """Choose this adapter's support again: from `calibration` (one value per input feature, from
        data; see calibration.py) at the same size, or take `support` as given (chosen over all layers,
        or coupled to another layer's), whose size may differ.

        The trained values start again from their initial state; a new size means new parameter
        tensors, so choose supports before creating the optimizer.
        """
        out_features, in_features = self.delta_shape
        index_key = INDEX_OF_STRUCTURE[config.structure]
        indices = getattr(self, index_key)[adapter_name]
        seed = module_seed(config.seed, module_key)
        if support is None:
            exclude = self._taken_by(config.disjoint_from or [], config.structure)
            support = select(
                config.selection, config.structure, indices.numel(), (out_features, in_features), seed,
                self._base_weight_2d, group, exclude, calibration,
            )
        if support.numel() != indices.numel():
            block_key = {INDICES: VALUES, ROW_INDEX: ROW_BLOCK, COL_INDEX: COL_BLOCK}[index_key]
            old = getattr(self, block_key)[adapter_name]
            s = support.numel()
            shape = {VALUES: (s,), ROW_BLOCK: (s, in_features), COL_BLOCK: (out_features, s)}[block_key]
            new = nn.Parameter(old.new_zeros(shape), requires_grad=old.requires_grad)
            getattr(self, block_key)[adapter_name] = new
            indices = indices.new_empty(support.shape)
            getattr(self, index_key)[adapter_name] = indices
        indices.copy_(support.to(indices.dtype))
        self.prepare_layout(adapter_name)
        self.reset_parameters(adapter_name, config.init_weights, seed)
        self.sparse_uncalibrated.pop(adapter_name, None)

    def _taken_by(self, adapter_names: list[str], structure: str) -> Optional[torch.Tensor]:
        """The support of the given adapters on this layer, for a new adapter that must avoid it."""
        store = getattr(self, INDEX_OF_STRUCTURE[structure])
        taken = [store[name].long() for name in adapter_names if name in store]
        return torch.cat(taken) if taken else None

    def _store(self, adapter_name, key, shape, index_key, support, numel) -> None:
        getattr(self, key)[adapter_name] = nn.Parameter(torch.zeros(shape))
        getattr(self, index_key)[adapter_name] = support.to(index_dtype(numel))

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool, seed: int = 0) -> None:
        """Zero update when `init_weights`, else random values of the scale of the base weights.

        The draw depends on the adapter's name too: two adapters made from one config start apart
        (their supports, a function of the config and the module, may coincide)."""
        g = torch.Generator().manual_seed(module_seed(seed, adapter_name) % 2**62 + 1)
        bound = 1 / math.sqrt(self.in_features)
        for key in (VALUES, ROW_BLOCK, COL_BLOCK):
            if adapter_name in getattr(self, key):
                p = getattr(self, key)[adapter_name]
                if init_weights:
                    p.zero_()
                else:
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        if adapter_name in self.sparse_lora_A:
            a, b = self.sparse_lora_A[adapter_name], self.sparse_lora_B[adapter_name]
            # A as nn.Linear initialises its weight (LoRA does the same), B = 0 so that ΔW starts at 0
            a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
            if init_weights:
                b.zero_()
            else:
                b.copy_(torch.rand(b.shape, generator=g) * 2 / math.sqrt(b.shape[1]) - 1 / math.sqrt(b.shape[1]))

    def delete_adapter(self, adapter_name: str) -> None:
        # the state derived from the adapter's tensors (index layouts, the decoding plan) goes with them
        for cache in ("_sparse_layouts", "_sparse_decode"):
            self.__dict__.get(cache, {}).pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # -- reading an adapter ----------------------------------------------------------------------
    def get_delta(self, adapter_name: str, whole: bool = False) -> Optional[Delta]:
        """The update of one adapter on this layer as a `Delta`, or None if it has none here.

        `whole`: with full, detached copies of the trainable tensors (gathered under FSDP2), for work
        between optimizer steps; writes then go through full.py, not through this Delta."""

        modules = self._modules  # every store is a submodule: read them without nn.Module's slow __getattr__

        def get(key):
            store = modules[key]
            # a ParameterDict keeps its entries in _parameters, a BufferDict in _buffers, both under the adapter's name.
            # Indexing, not .get(): DeepSpeed ZeRO-3 replaces _parameters with a dict whose [] gathers on demand
            entries = store._parameters if key in PARAMETER_NAMES else store._buffers
            tensor = entries[adapter_name] if adapter_name in entries else None
            return full(tensor) if whole else tensor

        delta = Delta(
            *self.delta_shape,
            values=get(VALUES),
            indices=get(INDICES),
            row_block=get(ROW_BLOCK),
            row_index=get(ROW_INDEX),
            col_block=get(COL_BLOCK),
            col_index=get(COL_INDEX),
            lora_A=get(LORA_A),
            lora_B=get(LORA_B),
            scaling=self.sparse_scaling.get(adapter_name, 1.0),
            sparse_scale=self.sparse_part_scale.get(adapter_name, 1.0),
            frozen_slots=get(FROZEN_SLOTS),
            frozen_values=get(FROZEN_VALUES),
            row_span=self._span(get(ROW_INDEX)),
            col_span=self._span(get(COL_INDEX)),
            probe=self.sparse_probe.get(adapter_name),
            layout=None if whole else self._layout(adapter_name),
        )
        return None if delta.is_empty else delta

    def _layout(self, adapter_name: str) -> Optional[ops.Layout]:
        """The unstructured support's ops.Layout, kept until the support changes (a new buffer, or an in-place
        write, which bumps its version): its rows and columns are made once per support, not per forward."""
        indices = self._modules[INDICES]._buffers.get(adapter_name)  # a buffer: no engine gathers it
        if indices is None or torch.compiler.is_compiling():
            return None  # under torch.compile the split is part of the graph
        layouts = self.__dict__.setdefault("_sparse_layouts", {})
        layout, in_features = layouts.get(adapter_name), self.delta_shape[1]
        if layout is None or not layout.fits(indices, in_features):
            layout = layouts[adapter_name] = ops.Layout(indices, in_features)
        return layout

    def prepare_layout(self, adapter_name: str) -> None:
        """Make the support's index forms now, after a support change (a regrowth, a mask, a calibration), where
        the caller runs between steps and little memory is held, rather than in the next forward and backward."""
        layout = self._layout(adapter_name)
        values = self._modules[VALUES]._parameters.get(adapter_name)  # dtype and device only: no gather needed
        if layout is not None and values is not None and ops.csr_works(values.device, values.dtype):
            out_features, in_features = self.delta_shape
            layout.csr(out_features)
            # Δᵀ's pattern serves training's CSR path only, which denser supports do not take; a layer that needs
            # it anyway (hooks, several adapters) makes it at its first backward
            if self.training and ops.trains_by_csr(layout.indices.numel(), out_features, in_features,
                                                   values.device, values.dtype):
                layout.csr_t(out_features)

    def _span(self, indices: Optional[torch.Tensor]) -> Optional[tuple[int, int]]:
        """Whether a row/column index buffer is one contiguous range, cached until the buffer changes
        (in-place writes bump its version), so the check syncs with the device once, not every forward."""
        if indices is None or torch.compiler.is_compiling():
            return None  # the span is only a shortcut; reading it would break a compiled graph
        cache = self.__dict__.setdefault("_sparse_spans", {})
        hit = cache.get(id(indices))
        # the entry holds the tensor itself, so its id cannot be reused by another tensor while cached
        if hit is None or hit[0] is not indices or hit[1] != indices._version:
            if len(cache) > 16:
                cache.clear()
            hit = cache[id(indices)] = (indices, indices._version, ops.contiguous_span(indices))
        return hit[2]

    @torch.no_grad()
    def freeze_slots(self, adapter_name: str, frozen: torch.Tensor, optimizer=None) -> int:
        """Stop training the unstructured slots where `frozen` (a bool per value) is set, on top of those
        frozen already: they keep their learned values in the layer's frozen buffers (saved with the
        adapter), their trainable slots and per-element optimizer state are zeroed, so with a zero gradient
        every usual optimizer leaves them at zero. Returns how many slots are frozen now."""
        values, indices = self.sparse_values[adapter_name], self.sparse_indices[adapter_name]
        frozen = frozen.clone()
        if adapter_name in self.sparse_frozen_slots:
            frozen[self.sparse_frozen_slots[adapter_name].long()] = True
        slots = frozen.nonzero().squeeze(1)
        # stored unscaled: effective_values applies the scale after the frozen ones are put in
        delta = self.get_delta(adapter_name, whole=True)
        self.sparse_frozen_values[adapter_name] = delta.effective_values(scaled=False)[slots].clone()
        self.sparse_frozen_slots[adapter_name] = slots.to(indices.dtype)
        optimizer = unwrap_optimizer(optimizer)
        whole = full(values).clone()  # sharded or partitioned: the whole tensor, then this rank's part of it
        whole[slots] = 0
        write_(values, whole)
        for key in state_keys(optimizer, values):
            whole = read_state(optimizer, values, key).clone()
            whole[slots] = 0
            write_state_(optimizer, values, key, whole)
        return slots.numel()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW as a dense tensor in the base weight's layout (for inspection and LoRA conversion)."""
        return self._from_2d(self.get_delta(adapter_name).dense())

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            delta = self.get_delta(name)
            if delta is not None:
                self._add_to_base(delta, 1.0, safe_merge, name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.get_delta(name)
            if delta is not None:
                self._add_to_base(delta, -1.0, False, name)

    @torch.no_grad()
    def _add_to_base(self, delta: Delta, sign: float, safe: bool, name: str) -> None:
        base = self.get_base_layer()
        backend = self.quantization_backend
        if backend is not None:
            if not backend.supports_merge:
                raise ValueError(
                    f"cannot merge into a {backend.backend_name} layer; it cannot be dequantized: keep the adapter "
                    "unmerged, or load the base unquantized to merge"
                )
            # one fixed text per backend: Python's default filter shows it once, however many layers merge
            warnings.warn(
                f"merging an adapter into (or unmerging it from) a {backend.backend_name} base layer rounds the "
                "updated weight to the quantization grid again, so the merged model only approximates the "
                "adapter's outputs and unmerging does not restore the base exactly; for an exact merge, load "
                "the base unquantized (e.g. torch_dtype=torch.bfloat16) and load the adapter onto it",
                UserWarning,
            )
            weight = dequantized_weight(backend, base)  # a fresh tensor: always safe to edit
        else:
            weight = base.weight.data.clone() if safe else base.weight.data
        delta.add_to(self._as_2d(weight), sign)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {name} seems to be broken (non-finite values, "
                "e.g. from a diverged run or a low-precision overflow): the base was left unmerged; check the "
                "adapter's values, or merge in a wider dtype"
            )
        if backend is not None:
            backend.set_base_weight(self, weight)
        elif safe:
            base.weight.data = weight

    # -- forward -------------------------------------------------------------------------------
    # whether one token's update may be added into the base layer's output in place (a fresh tensor of the
    # update's layout: a linear layer's; not a convolution's)
    _decodes_in_place = False

    def _delta_forward(self, x: torch.Tensor, delta: Delta) -> torch.Tensor:
        return delta.apply(x)

    def sparse_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus the update of every active adapter present here."""
        adapter_names = kwargs.pop("adapter_names", None)  # a mixed batch (SparseModel._enable_peft_forward_hooks)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
            decoded = self._decode(x)
            if decoded is not None:
                return decoded
        if self.sparse_uncalibrated and self.training and torch.is_grad_enabled():
            pending = [name for name in self.active_adapters if name in self.sparse_uncalibrated]
            if pending:
                raise RuntimeError(
                    f"adapter {pending[0]!r} chooses its support from calibration data: run "
                    "sparse_peft.calibrate(model, batches) on some training batches before training"
                )
        deltas = [d for d in (self.get_delta(name) for name in self.active_adapters) if d is not None]
        noise = self._noise() if self.sparse_noise and self.training else None
        if len(deltas) == 1 and not args and not kwargs and noise is None:
            fused = self._fused_forward(x, deltas[0])
            if fused is not None:
                return fused
        if noise is not None:
            folded = self._foldable_into_noise(deltas)
            result = self._perturbed_base_forward(x, *noise, folded)
            if folded is not None:
                deltas = []
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        in_place = self._decodes_in_place and not self.get_base_layer()._forward_hooks and not _global_forward_hooks
        for delta in deltas:
            if in_place and delta.apply_into(x, result):
                continue  # one token at inference: added into the base output in place (no hook has seen it)
            update = self._delta_forward(x, delta)
            result = result + (update if update.dtype == result.dtype else update.to(result.dtype))
        return result

    def _decode(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Decoding: one token at inference, one active adapter. The base layer's output with the update added into
        it in place (Delta.decode_add) by the Delta kept between calls (_decoding_delta): a call is then the
        products and a few identity checks. None where this path does not apply; the general path runs then."""
        if (not self._decodes_in_place or self.quantization_backend is not None or _global_forward_hooks
                or (self.sparse_noise and self.training)):  # LoRA-GGPO perturbs the base in training mode
            return None
        name = self._active_adapter  # a name, or a list of them
        if not isinstance(name, str):
            if len(name) != 1:
                return None  # several adapters: the general path
            name = name[0]
        base = self._modules["base_layer"]
        if base._forward_hooks or isinstance(base, BaseTunerLayer):
            return None  # a hook that may keep the base output; a stacked tuner layer
        delta = self._decoding_delta(name, x)
        if delta is None:
            return None
        result = base(x)
        if not result.is_contiguous():  # a base layer of another kind, say: the update added the general way
            return result + self._delta_forward(x, delta).to(result.dtype)
        delta.decode_add(result.view(-1), x.reshape(-1))
        return result

    def _decoding_delta(self, name: str, x: torch.Tensor) -> Optional[Delta]:
        """Adapter `name`'s update as a Delta that Delta.decode_add takes, kept between calls, for inputs like x
        (its dtype, autocast off); None where there is none or decode_add cannot add it.

        At decoding sizes get_delta's lookups and the general path's checks cost more than the products (PEFT's
        LoRA layer is the yardstick: `python benchmarks/serving.py --forward`). The kept Delta is used only while
        every tensor the adapter stores on this layer is the very one it was made from, unwritten since (their
        versions), and the scales are unchanged: a reload, a regrowth, an optimizer step, a new or deleted part,
        SaRA's frozen slots each make a new one. Not while torch.compile traces: a captured graph has no per-call
        Python to save, and the check reads tensor versions, on which Dynamo cannot always guard."""
        if torch.compiler.is_compiling():
            return None
        plan = self.__dict__.setdefault("_sparse_decode", {}).get(name)
        if plan is None or not plan.holds(self, name):
            plan = self._sparse_decode[name] = _DecodePlan(self, name)
        delta = plan.delta
        if delta is None or x.dtype is not plan.dtype or torch.is_autocast_enabled(plan.device_type):
            return None
        return delta

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sample i gets adapter adapter_names[i] ("__base__": none): the base output, plus each
        adapter's update computed on its own samples only."""
        if len(adapter_names) != len(x):
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {len(x)}; give one name per sample")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first.")
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        # in place into the base output, unless a forward hook on the base layer has seen (and may keep) it
        in_place = not self.get_base_layer()._forward_hooks and not _global_forward_hooks
        # decoding (one token per sample, no autograd), few samples per adapter: each sample's update added into its
        # row by decode_add, fewer and cheaper calls than a gather, a product over the group and a scatter
        decoding = (in_place and self._decodes_in_place and not torch.is_grad_enabled() and result.is_contiguous()
                    and x.numel() == len(x) * x.shape[-1])
        for name, rows, listed in self._sample_groups(adapter_names, x.device):
            delta = self._decoding_delta(name, x) if decoding and len(listed) <= DECODE_SAMPLES_MAX else None
            if delta is not None:
                out, inp = result.view(len(x), -1), x.reshape(len(x), -1)
                for row in listed:
                    delta.decode_add(out[row], inp[row])
                continue
            delta = self.get_delta(name)
            if delta is not None:
                update = self._delta_forward(x.index_select(0, rows), delta).to(result.dtype)
                result = result.index_add_(0, rows, update) if in_place else result.index_add(0, rows, update)
        return result

    def _sample_groups(self, adapter_names: list[str], device) -> list[tuple[str, torch.Tensor, list[int]]]:
        """(adapter, the rows of its samples as a tensor and as a list) for each adapter named in a mixed batch,
        "__base__" left out, kept for the last list of names seen: generate passes the same names at every step,
        so they are made once (and the list is never read back from the device)."""
        key = (tuple(adapter_names), device)
        kept = self.__dict__.get("_sparse_groups")
        if kept is not None and kept[0] == key:
            return kept[1]
        groups = []
        for name in dict.fromkeys(adapter_names):
            if name != "__base__":
                listed = [i for i, n in enumerate(adapter_names) if n == name]
                groups.append((name, torch.tensor(listed, device=device), listed))
        self.__dict__["_sparse_groups"] = (key, groups)
        return groups

    def _fused_forward(self, x: torch.Tensor, delta: Delta) -> Optional[torch.Tensor]:
        """The whole layer in one op where that is exact and faster; None where it is not."""
        return None

    def _noise(self) -> Optional[tuple[torch.Tensor, int]]:
        return next((self.sparse_noise[name] for name in self.active_adapters if name in self.sparse_noise), None)

    def check_perturbable(self) -> None:
        """LoRA-GGPO perturbs the base weight inside the forward; only plain linear layers allow that."""
        raise ValueError(
            f"perturbation='ggpo' supports nn.Linear and Conv1D layers, not {type(self.get_base_layer()).__name__}: "
            "leave such layers out of target_modules"
        )

    def _foldable_into_noise(self, deltas: list[Delta]) -> Optional[Delta]:
        # GGPO builds a scratch W0 + ε each pass anyway; a lone LoRA update of the weight's dtype
        # joins it (one GEMM per pass, no per-token add). Another dtype keeps its own path, so that
        # no small update is rounded into a low-precision weight.
        if len(deltas) != 1 or not deltas[0].is_low_rank_only:
            return None
        return deltas[0] if deltas[0].lora_A.dtype == self.get_base_layer().weight.dtype else None

    def _perturbed_base_forward(
        self, x: torch.Tensor, row_std: torch.Tensor, seed: int, delta: Optional[Delta] = None
    ) -> torch.Tensor:
        """x·(W0 + ε)ᵀ + b, plus the update of `delta` (low-rank only) folded into the same weight."""
        base = self.get_base_layer()
        lora = () if delta is None else (delta.lora_A, delta.lora_B, delta.scaling)
        return perturbed_linear(x, self._as_2d(base.weight), base.bias, row_std, seed, *lora)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, "SparseLayer"]:
    """{module name: sparse layer} of every layer of `model` that holds `adapter_name`."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SparseLayer) and adapter_name in m._all_available_adapter_names()}


class _Module(nn.Module, SparseLayer):
    # nn.Module comes first in the bases (PEFT's convention), so its placeholder `forward` and its
    # `__repr__` would shadow SparseLayer's: define them here.
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.sparse_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()


class Linear(_Module):
    """nn.Linear, transformers' Conv1D (GPT-2, weight stored in × out) and quantized linear layers."""

    _decodes_in_place = True

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SparseConfig, module_key: str = "", group: int = 1, **kwargs
    ):
        super().__init__()
        SparseLayer.__init__(self, base_layer, **kwargs)
        self._transposed = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key, inference_mode=config.inference_mode, group=group)

    def _as_2d(self, weight):
        return weight.t() if self._transposed else weight

    def _from_2d(self, weight2d):
        return weight2d.t() if self._transposed else weight2d

    def check_perturbable(self) -> None:
        if self.quantization_backend is not None:
            raise ValueError(
                f"perturbation='ggpo' needs the base weights in full precision; this layer is "
                f"{self.quantization_backend.backend_name}-quantized. Use a non-quantized base or perturbation='none'."
            )

    def _fused_forward(self, x, delta):
        # The whole layer in one op, the base layer's forward skipped: only for a plain, frozen nn.Linear with no
        # hooks and trainable tensors of the weight's dtype (no rounding of Δ). Trainable input columns alone
        # (S²FT, PaCA): ops.ColumnLinear with the base weight, one dx in backward. An unstructured Δ (plus, for
        # DSEE and SLTrain, a low-rank part, folded into the same scratch weight): one GEMM against a scratch
        # W + S (ops.MergedSparseLinear) where ops.scratch_pays says it beats base GEMM + sparse product.
        base = self.get_base_layer()
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if (delta.col_block is not None and delta.values is None and delta.row_block is None and delta.lora_A is None
                and delta.col_block.dtype == weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)):
            return ops.column_linear(x, delta._scaled(delta.col_block), delta.col_index, delta.col_span, weight, bias)
        if not (delta.values is not None and delta.values.numel()) or any(
            t is not None for t in (delta.row_block, delta.col_block)
        ):
            return None
        n_tokens = x.numel() // x.shape[-1]
        if n_tokens == 1:
            return None  # decoding: the base layer's product plus the update's own is always the faster path
        if weight.dtype != delta.values.dtype:
            return None
        if delta.lora_A is not None and delta.lora_A.dtype != weight.dtype:
            return None
        training = self.training and torch.is_grad_enabled()
        if not ops.scratch_pays(n_tokens, delta.values, delta.layout, *weight.shape, training):
            return None  # the base layer's GEMM plus the update's own product (CSR, or a gather) is the faster path
        return ops.merged_sparse_linear(
            x, weight, bias, delta.effective_values(), delta.indices, delta.probe, delta.lora_A, delta.lora_B, delta.scaling
        )


class Conv2d(_Module):
    """nn.Conv2d; ΔW lives on the weight flattened to (out_channels × in_channels/groups·kh·kw).

    The convolution of x with ΔW is done by the base layer's own conv on a dense ΔW built each
    forward (the sparse linear kernels do not apply to a convolution).
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SparseConfig, module_key: str = "", group: int = 1, **kwargs
    ):
        super().__init__()
        SparseLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_key, inference_mode=config.inference_mode)

    def update_layer(self, adapter_name: str, config: SparseConfig, module_key: str = "", *args, **kwargs) -> None:
        if config.structure == "columns":
            # a column of the flattened kernel is one tap of one input channel: not what "columns" (input
            # features, S²FT's channels) means, and the convolution's ΔW is dense anyway
            raise ValueError(
                f"{module_key or 'this Conv2d'}: structure='columns' is not supported on Conv2d layers; use "
                "'rows' (whole output channels), 'unstructured' or 'none' there, or leave Conv2d out of target_modules"
            )
        super().update_layer(adapter_name, config, module_key, *args, **kwargs)

    @property
    def delta_shape(self) -> tuple[int, int]:
        weight = self.get_base_layer().weight
        return weight.shape[0], weight[0].numel()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.get_base_layer().weight.shape)

    def _as_2d(self, weight):
        return weight.view(weight.shape[0], -1)

    def _from_2d(self, weight2d):
        return weight2d.view(self.get_base_layer().weight.shape)

    def _delta_forward(self, x, delta):
        base = self.get_base_layer()
        delta_weight = self._from_2d(delta.dense())
        return base._conv_forward(x.to(delta_weight.dtype), delta_weight, None)
