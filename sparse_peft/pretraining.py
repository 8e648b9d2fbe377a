"""SLTrain's pretraining mode: every targeted linear layer of a fresh model becomes W = (α/r)·B·A + S.

    model = AutoModelForCausalLM.from_config(config)           # random weights, nothing frozen
    sparse_peft.pretraining.convert(model, rank=128, density=0.03)  # in place; returns the model
    ... train every parameter ...
    model.save_pretrained(folder)                              # values only: no index arrays
    model = sparse_peft.pretraining.from_pretrained(folder)        # regenerates the supports from the seed
    dense = sparse_peft.pretraining.densify(model)                 # plain nn.Linear layers, for any tool

There is no frozen W0 here, so this is not a PEFT adapter: the trained model is the artifact.
(Fine-tuning a pretrained model with W0 + B·A + S is `SparseConfig(method="sltrain")`.)

The support S lives on is uniform at the given density, drawn by `prng.seeded_subset` from the
seed and the module's name: the same on every device and torch version, so files hold values only.
The forward goes through the same ops as the adapters: neither S nor the full weight is ever made
dense, and the backward computes S's gradient at its support only.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Union

import torch
import torch.nn as nn

from . import ops
from .delta import Delta
from .prng import seed_for, seeded_subset


CONFIG_KEY = "sltrain"  # the spec is kept in the model config under this key, so save_pretrained writes it


class SLTrainLinear(nn.Module):
    """y = x·((α/r)·B·A + S)ᵀ + b, S with `values` at a fixed random support of flat row-major indices."""

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, alpha: float, seed: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / rank if rank else 0.0
        k = max(1, round(density * in_features * out_features))
        factory = dict(device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory)) if rank else None
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **factory)) if rank else None
        self.values = nn.Parameter(torch.empty(k, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # not persistent: regenerated from the seed, so checkpoints hold no index arrays
        indices = seeded_subset(in_features * out_features, k, seed).to(torch.int32 if in_features * out_features < 2**31 else torch.int64)
        self.register_buffer("indices", indices.to(device) if device is not None else indices, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # SLTrain's initialisation (paper §3.3): A as nn.Linear's, B = 0, S's values U(±1/sqrt(in)), bias as nn.Linear's
        bound = 1 / math.sqrt(self.in_features)
        if self.lora_A is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
        self.values.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-1 / math.sqrt(self.out_features), 1 / math.sqrt(self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_tokens = x.numel() // x.shape[-1]
        if ops.product_mode(n_tokens, self.values.numel(), self.out_features, self.in_features) == "gather":
            y = self._delta().apply(x)  # few tokens (decoding): a gather over the support and two thin products
        else:
            # one GEMM per pass on a scratch (α/r)·B·A + S, as full rank costs, plus the scratch.
            # The op adds the update to a frozen base it copies; here the base is zero: an
            # expanded scalar, which holds no memory and whose copy is a fresh dense zero matrix.
            zero = self.values.new_zeros(()).expand(self.out_features, self.in_features)
            y = ops.merged_sparse_linear(x.to(self.values.dtype), zero, None, self.values, self.indices,
                                         None, self.lora_A, self.lora_B, self.scaling)
        return y if self.bias is None else y + self.bias

    def _delta(self) -> Delta:
        # the same update an SLTrain adapter holds: the core's math applies and densifies it
        return Delta(self.out_features, self.in_features, values=self.values, indices=self.indices,
                     lora_A=self.lora_A, lora_B=self.lora_B, scaling=self.scaling)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self._delta().dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, nnz={self.values.numel()}"


def _targets(model: nn.Module, target_modules: Union[str, Iterable[str], None]) -> list[str]:
    """Linear layers to replace: the transformer blocks' ("all-linear": every nn.Linear but the output head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is output:
            continue
        if target_modules in (None, "all-linear") or any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def convert(model: nn.Module, rank: int = 8, density: float = 0.03, alpha: float = 32.0, seed: int = 0,
            target_modules: Union[str, list[str], None] = "all-linear") -> nn.Module:
    """Replace the targeted nn.Linear layers of a freshly initialised model by SLTrainLinear, in place.

    The old weights are dropped (pretraining starts from SLTrain's own initialisation). Records the
    settings in `model.config.sltrain`, which `save_pretrained` writes and `from_pretrained` reads.
    """
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank={rank!r} must be an integer >= 0")
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be in (0, 1]")
    names = _targets(model, target_modules)
    if not names:
        raise ValueError(f"no nn.Linear layer of the model matches target_modules={target_modules!r}")
    for name in names:
        old = model.get_submodule(name)
        new = SLTrainLinear(old.in_features, old.out_features, rank, density, alpha, seed_for(seed, name),
                            bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    spec = dict(rank=rank, density=density, alpha=alpha, seed=seed, target_modules=names)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, spec)
    return model


def from_pretrained(folder: str, model_class=None, **kwargs) -> nn.Module:
    """Load a model trained after `convert` and saved with `save_pretrained` (safetensors only)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, **kwargs)
    spec = getattr(config, CONFIG_KEY, None)
    if not spec:
        raise ValueError(f"{folder} holds no SLTrain model: its config.json has no {CONFIG_KEY!r} entry")
    model = (model_class or AutoModelForCausalLM).from_config(config)
    convert(model, spec["rank"], spec["density"], spec["alpha"], spec["seed"], spec["target_modules"])
    files = _weight_files(folder)
    state = {}
    for path in files:
        state.update(load_file(path))
    expected = model.state_dict()
    # tied weights (lm_head = embed_tokens) are saved once
    missing = [k for k in expected if k not in state and not _is_tied(model, k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{folder}: the weights do not fit the SLTrain model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the file was saved from another model or is corrupt")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}; "
                             "the file was saved from another model or is corrupt")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no model.safetensors (only safetensors files are read)")
    return [path]


def _is_tied(model: nn.Module, key: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return output is not None and inputs is not None and output.weight is inputs.weight and key.endswith("weight") \
        and "lm_head" in key


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace every SLTrainLinear by a plain nn.Linear holding (α/r)·B·A + S (SLTrain's merge), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SLTrainLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.values.device, dtype=module.values.dtype)
            dense.weight.copy_(module.dense_weight())
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    if getattr(model, "config", None) is not None and hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model
