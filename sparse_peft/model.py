from __future__ import annotations

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils import resolve_quantization_backend
from transformers.pytorch_utils import Conv1D

from . import architectures, hub
from ._peft import PREFIX
from .config import SparseConfig
from .layer import Conv2d, Linear, SparseLayer
from .methods import METHODS


SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Conv2d and bitsandbytes Linear8bitLt / Linear4bit"


def _layer_class(base: nn.Module):
    if isinstance(base, (nn.Linear, Conv1D)):
        return Linear
    if isinstance(base, nn.Conv2d):
        return Conv2d
    backend = resolve_quantization_backend(base)
    if backend is not None and backend.layer_type == "linear":
        return Linear
    return None


class SparseModel(BaseTuner):
    """
    Creates a sparse fine-tuning model from a pretrained transformers model.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to be adapted.
        config ([`SparseConfig`]): The configuration of the sparse adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.

    Returns:
        `torch.nn.Module`: The sparse model.

    Example:

        ```py
        >>> import sparse_peft  # registers the method with PEFT
        >>> from peft import get_peft_model
        >>> from sparse_peft import SparseConfig
        >>> model = get_peft_model(base_model, SparseConfig(method="spiel", target_modules="all-linear"))
        >>> model.print_trainable_parameters()
        ```

    **Attributes**:
        - **model** ([`~transformers.PreTrainedModel`]) -- The model to be adapted.
        - **peft_config** ([`SparseConfig`]): The configuration of the sparse model.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SparseLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if config.num_trainable is not None:
            self._spread_budget(config)
        group = self._head_size(config, current_key)
        if isinstance(target, SparseLayer):
            target.update_layer(adapter_name, config, current_key, inference_mode=config.inference_mode, group=group)
            return
        layer_cls = _layer_class(target)
        if layer_cls is None:
            raise ValueError(
                f"Target module {current_key!r} is a {type(target).__name__}, which sparse_peft cannot adapt; "
                f"supported are {SUPPORTED}. Remove it from target_modules or add it to exclude_modules."
            )
        new_module = layer_cls(target, adapter_name, config, current_key, group=group, **get_quantization_kwargs(self))
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until it is made active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _prepare_adapter_config(self, config, model_config):
        method = METHODS.get(config.method)
        if config.target_modules is None and method is not None and method.target_roles:
            config.target_modules = set(architectures.role_targets(model_config, method.target_roles))
            return config
        return super()._prepare_adapter_config(config, model_config)

    def _head_size(self, config, module_key: str) -> int:
        """head_dim for the attention output projection when heads are the unit, else 1."""
        if not config.head_groups:
            return 1
        model_config = self.get_model_config(self.model)
        suffix = architectures.roles_for(model_config).attention_output
        return architectures.head_dim(model_config) if module_key.endswith("." + suffix) else 1

    def _spread_budget(self, config) -> None:
        """Turn a total budget into the density that spreads it over the targets by size (once per config)."""
        if getattr(config, "_budget_spread", False):
            return
        total = 0
        for key, module in self.model.named_modules():
            base = module.get_base_layer() if isinstance(module, SparseLayer) else module
            if self._check_target_module_exists(config, key) and _layer_class(base) is not None:
                if isinstance(base, nn.Conv2d):
                    total += base.weight.numel()
                else:  # never weight.numel(): bitsandbytes packs 4-bit weights two to a byte
                    in_features, out_features = _get_in_out_features(base)
                    total += in_features * out_features
        if total == 0:
            return
        config.density = min(1.0, config.num_trainable / total)
        config._budget_spread = True

    def _replace_module(self, parent, child_name, new_module, child):
        # BaseTuner's version breaks merge_and_unload when trainable_token_indices is used (it assigns
        # a tensor to a wrapper's weight); this is the simpler version LoRA uses.
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        weight = getattr(child, "qweight", None)
        if weight is None:
            weight = child.weight if hasattr(child, "weight") else next(child.parameters())
        meta = torch.device("meta")
        for name, module in new_module.named_modules():
            if self.prefix in name and not any(p.device == meta for p in module.parameters()):
                module.to(weight.device)

    def _post_injection_hook(self, model, config, adapter_name):
        # tags let people find sparse_peft adapters on the Hub; PEFT copies them into the model card
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["sparse_peft", f"sparse_peft:{config.method or 'custom'}"])

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            hub.check_and_fit(model, adapter_name, state_dict, cls.prefix)
        except ValueError:
            _discard_adapter(model, adapter_name)
            raise
        return state_dict


def _discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of an adapter whose weights were refused, so the model is as before."""
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, SparseLayer) or adapter_name not in module._all_available_adapter_names():
            continue
        module.delete_adapter(adapter_name)
        if not module._all_available_adapter_names():
            parent_name, _, child_name = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module.get_base_layer())
    for holder in (model, getattr(model, "base_model", None)):
        configs = getattr(holder, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_name, None)
    base = getattr(getattr(model, "base_model", None), "model", None)
    if base is not None and getattr(base, "peft_config", None) == {}:
        del base.peft_config


__all__ = ["SparseModel", "BaseTunerLayer"]
