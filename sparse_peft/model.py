from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_quantization_kwargs
from peft.utils import resolve_quantization_backend
from transformers.pytorch_utils import Conv1D

from . import architectures, files, schedule
from ._peft import PREFIX
from .config import SparseConfig, unit_size
from .delta import INDICES, index_dtype
from .full import full, gathered
from .layer import Conv2d, Linear, SparseLayer, adapter_layers
from .methods import METHODS
from .selection import CALIBRATION_RULES, module_seed, select_global


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
        config = self._layer_config(config, current_key)
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
        rule = None
        if config.target_modules is None:
            method = METHODS.get(config.method)
            rule = method.default_targets if method is not None else "query_value"
            config.target_modules = architectures.default_targets(
                self.model, model_config, rule, method.target_roles if method is not None else (),
                config.method, config.task_type,
            )
        else:
            _refuse_expert_targets(self.model, config)
        if config.coupled_rows:
            # refuses a model without a map, and roles whose producing layer is fused or absent
            rows = architectures.row_pairs(model_config, config.coupled_rows)
            keys = [key for key, _ in self.model.named_modules()]
            for role in config.coupled_rows:
                suffixes = sorted(s for s, (_, r) in rows.items() if r == role)
                if not any(k == s or k.endswith("." + s) for k in keys for s in suffixes):
                    raise ValueError(
                        f"coupled_rows={config.coupled_rows} couples the rows of {suffixes}, and this model has no such "
                        "layer (a mixture-of-experts FFN keeps its experts as fused 3-D parameters, which sparse_peft "
                        f"cannot adapt): remove {role!r} from coupled_rows"
                    )
            if isinstance(config.target_modules, (set, list)):
                # a regex or "all-linear" must match them itself; choose_supports checks every pair
                config.target_modules = set(config.target_modules) | set(rows)
        if rule is not None:
            self._report_default_targets(config, rule)
        if config.head_groups and architectures.known_roles(model_config) is None:
            architectures.logger.warning(
                "sparse_peft: no map of heads for model_type=%r, so head_groups chooses plain input columns on every "
                "target", model_config.get("model_type"),
            )
        return config

    def _report_default_targets(self, config, rule: str) -> None:
        """One visible line per adapter whose targets were chosen for the user: method, rule, module count."""
        adapted = [key for key, module in self.model.named_modules() if key and self._check_target_module_exists(config, key)
                   and (isinstance(module, SparseLayer) or _layer_class(module) is not None)]
        kinds = sorted({key.rsplit(".", 1)[-1] for key in adapted})
        rule_text = architectures.DEFAULT_RULES[rule]
        if rule == "roles":
            rule_text += f" ({', '.join(METHODS[config.method].target_roles)})"
        frozen = architectures.fused_experts(self.model)
        note = (f"; the experts of {len(frozen)} mixture-of-experts block(s) are fused 3-D parameters, not layers, "
                f"and stay frozen (e.g. {frozen[0][0]})" if frozen else "")
        architectures.logger.warning(
            "sparse_peft: method=%r without target_modules adapts %s: %d modules (%s)%s; pass target_modules to choose",
            config.method, rule_text, len(adapted), ", ".join(kinds[:8]) + (", ..." if len(kinds) > 8 else ""), note,
        )

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        config = self.peft_config[adapter_name]
        unknown = [a for a in config.disjoint_from or [] if a not in self.peft_config or a == adapter_name]
        if unknown:
            others = sorted(set(self.peft_config) - {adapter_name})
            raise ValueError(
                f"disjoint_from={config.disjoint_from} names {unknown}, which is not another adapter of this model "
                f"(it has {others or 'no other adapter'}): add that adapter first, or fix the name"
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        try:
            self._check_injected(adapter_name)
            # supports that depend on several layers can only be chosen once every layer exists
            self.choose_supports(adapter_name)
            # the method's per-step work runs around the optimizer's steps, with no user action
            schedule.attach_automatic(self, adapter_name)
        except Exception:
            # refused after injection: take the adapter out again, so the model is as it was
            _discard_adapter(self.model, adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise

    def _check_injected(self, adapter_name: str) -> None:
        """What can only be checked once every target has its layer: names that matched nothing."""
        config = self.peft_config[adapter_name]
        keys = list(adapter_layers(self.model, adapter_name))
        for suffix in config.module_density or {}:
            if not any(k == suffix or k.endswith("." + suffix) for k in keys):
                names = sorted({k.rsplit(".", 1)[-1] for k in keys})
                raise ValueError(
                    f"module_density key {suffix!r} matches no adapted module (adapted modules end in {names}): "
                    "fix the key (a module name or its suffix) or add that module to target_modules"
                )

    def _check_total(self, adapter_name: str) -> None:
        """Once the supports are chosen (choose_supports; pooled ones included): a total budget that whole units
        could not honour."""
        config = self.peft_config[adapter_name]
        if config.num_trainable is not None:
            chosen, _ = self._layers_of(adapter_name)  # coupled rows follow their partner: outside the budget
            got = sum(d.num_sparse() for d in (m.get_delta(adapter_name) for m in chosen.values()) if d is not None)
            if abs(got - config.num_trainable) > 0.05 * config.num_trainable:
                pooled = config.allocation == "global"
                warnings.warn(
                    f"num_trainable={config.num_trainable:,} was asked, but {got:,} sparse parameters train "
                    f"({got / config.num_trainable - 1:+.0%}): each layer trains whole units (rows, columns, or heads "
                    "of head_dim columns) and " + ("each pool of layers at least one. For a closer total use "
                    if pooled else "at least one. For a closer total use allocation='global' (one pool over the "
                    "layers), ") + "fewer target modules, or a budget per layer (density).",
                    stacklevel=4,
                )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        schedule.forget(self, adapter_name)

    def __setstate__(self, state) -> None:
        # a copy (copy.deepcopy, pickle) is a new model: its scheduled adapters get schedulers of their own,
        # starting from step 0, or a copy trained in a plain loop would run without its method's steps
        super().__setstate__(state)
        for name in list(self.peft_config):
            schedule.attach_automatic(self, name)

    # -- mixed-adapter batches -------------------------------------------------------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`model(..., adapter_names=[...])` / `generate(...)`: one adapter name per sample ("__base__"
        for none), at inference, as PEFT's LoRA has it. PeftModel calls this around every forward;
        the names reach each sparse layer through a forward pre-hook while the call lasts."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {"__base__"})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; "
                             f"this model has {sorted(self.peft_config)} (and '__base__' for no adapter)")
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            names = [n for n in names for _ in range(num_beams)]  # generate repeats each sample per beam

        def inject(names):
            return lambda module, args, kw: (args, {**kw, "adapter_names": names})

        handles = [m.register_forward_pre_hook(inject(names), with_kwargs=True)
                   for m in self.model.modules() if isinstance(m, SparseLayer)]
        encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
        if encoder is not None and encoder is not self.model and names is not adapter_names:
            # an encoder runs once per sample, not per beam: its hooks (registered later, so they win) keep the originals
            handles += [m.register_forward_pre_hook(inject(list(adapter_names)), with_kwargs=True)
                        for m in encoder.modules() if isinstance(m, SparseLayer)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- combining adapters ----------------------------------------------------------------------
    @torch.no_grad()
    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add `adapter_name`, whose update on every layer is Σ weights[i] · ΔW of adapters[i], exactly.

        PEFT's LoRA method of the same name, "linear" kind: sparse diffs compose by addition (a
        language and a task adapter, task arithmetic with negative weights). The sparse parts of
        all adapters (entries, rows, columns) become one unstructured support, their union, with
        summed values; low-rank parts are stacked (rank = the sum of the ranks, scaling 1), so
        nothing is approximated. The new adapter is not active: `set_adapter` it. It saves and
        loads like any other (its layers may differ in size; the file says how).
        """
        if combination_type != "linear":
            raise ValueError(f"combination_type={combination_type!r} is not supported; sparse adapters combine exactly "
                             "with combination_type='linear' (a weighted sum)")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(self.peft_config)}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; choose another name or delete it first")
        layers = {}
        for key, module in self.model.named_modules():
            if isinstance(module, SparseLayer):
                deltas = [(w, module.get_delta(a)) for a, w in zip(adapters, weights)]
                deltas = [(w, d) for w, d in deltas if d is not None]
                if deltas:
                    layers[key] = (module, deltas)
        has_sparse = any(d.values is not None or d.row_block is not None or d.col_block is not None
                         for _, ds in layers.values() for _, d in ds)
        rank = max((sum(d.lora_A.shape[0] for _, d in ds if d.lora_A is not None) for _, ds in layers.values()), default=0)
        entries, size = 0, 0
        combined = {}
        for key, (module, deltas) in layers.items():
            combined[key] = _combine(deltas, *module.delta_shape)
            entries, size = entries + combined[key][1].numel(), size + module.delta_shape[0] * module.delta_shape[1]
        first = self.peft_config[adapters[0]]
        config = SparseConfig(
            structure="unstructured" if has_sparse else "none", density=min(1.0, max(entries, 1) / size),
            r=rank, lora_alpha=rank or None, target_modules=sorted(layers), init_weights=True,
            base_model_name_or_path=first.base_model_name_or_path, revision=first.revision, task_type=first.task_type,
        )
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        for key, (module, _) in layers.items():
            positions, values, lora_a, lora_b = combined[key]
            if has_sparse:
                module.sparse_values[adapter_name] = nn.Parameter(values, requires_grad=False)
                module.sparse_indices[adapter_name] = positions.to(index_dtype(module.delta_shape[0] * module.delta_shape[1]))
            if rank:
                module.sparse_lora_A[adapter_name] = nn.Parameter(lora_a, requires_grad=False)
                module.sparse_lora_B[adapter_name] = nn.Parameter(lora_b, requires_grad=False)
                module.sparse_scaling[adapter_name] = 1.0
            module.sparse_part_scale[adapter_name] = 1.0

    # -- supports chosen over several layers ------------------------------------------------------
    def choose_supports(self, adapter_name: str, calibration: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Choose the supports that need more than one layer at a time.

        - `calibration` ({module name: one value per input feature}, from `sparse_peft.calibrate`):
          every layer's support is chosen again from it;
        - allocation="global": the layers of one role are chosen together, from one pooled budget;
        - coupled rows take the units chosen on their partner's columns.

        Runs after injection and from `sparse_peft.calibrate`. Without calibration data, a rule that
        needs it leaves its placeholders (and the coupled rows on them) to refuse training.
        """
        config = self.peft_config[adapter_name]
        if config.structure == "none":
            return
        chosen, coupled = self._layers_of(adapter_name)
        waiting = config.selection in CALIBRATION_RULES and calibration is None
        if config.allocation == "global" and not waiting:
            self._choose_globally(adapter_name, config, chosen, calibration)
        elif calibration is not None:
            for key, layer in chosen.items():
                group = self._head_size(config, key)
                layer.calibrate_support(adapter_name, config, key, calibration[key], group=group)
        for key, (layer, partner, role) in coupled.items():
            source = chosen.get(partner)
            if source is None or adapter_name not in source.sparse_col_index:
                raise ValueError(
                    f"coupled_rows={config.coupled_rows} trains the rows of {key} at the units chosen on {partner}, "
                    "which this adapter does not adapt with structure='columns': add it to target_modules"
                )
            columns = source.sparse_col_index[adapter_name].long()
            if role == "value":
                model_config = self.get_model_config(self.model)
                head_size, share = architectures.head_dim(model_config), architectures.queries_per_kv(model_config)
                rows = architectures.value_rows(columns, head_size, share)
            else:  # FFN channel j: down's input column j is up's and gate's output row j
                rows = columns
            layer.calibrate_support(adapter_name, self._layer_config(config, key), key, support=rows)
            if adapter_name in source.sparse_uncalibrated:
                layer.sparse_uncalibrated[adapter_name] = True
        if not waiting:
            self._check_total(adapter_name)

    def _layers_of(self, adapter_name: str) -> tuple[dict, dict]:
        """The adapter's layers by module name: those that choose their support, and the coupled row
        layers as {name: (layer, partner name, row role)}."""
        config = self.peft_config[adapter_name]
        chosen, coupled = {}, {}
        for key, module in adapter_layers(self.model, adapter_name).items():
            partner = self._row_partner(config, key)
            if partner is None:
                chosen[key] = module
            else:
                coupled[key] = (module, *partner)
        return chosen, coupled

    def _choose_globally(self, adapter_name, config, layers: dict, calibration: Optional[dict]) -> None:
        """allocation="global": one pool per role (a module name with its layer number left out)."""
        pools: dict[tuple, list[str]] = {}
        for key, layer in layers.items():
            role = re.sub(r"\.\d+(?=\.|$)", ".*", key)  # model.layers.*.mlp.down_proj
            pools.setdefault((role, layer.delta_shape, self._head_size(config, key)), []).append(key)
        # One total over the roles: the pools are rounded coarsest unit first, and each later pool makes up what
        # the ones before rounded away (a whole head of o_proj taken back from the FFN channels), in parameters.
        # A density given per role (module_density) is each role's own: nothing moves between roles then.
        def coarsest_first(item) -> int:  # minus the parameters of one whole group of the pool's units
            (_, shape, group), _ = item
            return -unit_size(config.structure, *shape) * group

        carry = 0.0  # parameters that the pools rounded so far left over (negative: they took more than their share)
        for (role, shape, group), keys in sorted(pools.items(), key=coarsest_first):
            members = [layers[key] for key in keys]
            unit = unit_size(config.structure, *shape)
            # the layers' shares pooled, rounded to whole units once (a layer may get none), spread by score
            k = config.pool_budget(config.structure, *shape, keys, group, carry / unit)
            if not config.module_density:
                carry += (config.pool_share(config.structure, *shape, keys) - k) * unit
            supports = select_global(
                config.selection, config.structure, k, shape, module_seed(config.seed, role),
                [m._base_weight_2d for m in members], group,
                [m._taken_by(config.disjoint_from or [], config.structure) for m in members],
                None if calibration is None else [calibration[key] for key in keys],
            )
            for key, layer, support in zip(keys, members, supports):
                layer.calibrate_support(adapter_name, config, key, support=support)

    def _row_partner(self, config, module_key: str) -> Optional[tuple[str, str]]:
        """(partner module name, row role) when `coupled_rows` couples this module's rows, else None."""
        if not config.coupled_rows:
            return None
        pairs = architectures.row_pairs(self.get_model_config(self.model), config.coupled_rows)
        for suffix, (column_suffix, role) in pairs.items():
            if module_key == suffix or module_key.endswith("." + suffix):
                return module_key[: len(module_key) - len(suffix)] + column_suffix, role
        return None

    def _layer_config(self, config, module_key: str):
        """The config as one layer sees it. A coupled row layer gets a plain row support: a placeholder
        that `choose_supports` replaces by its partner's units once every layer exists."""
        if self._row_partner(config, module_key) is None:
            return config
        rows = copy.copy(config)
        rows.structure, rows.selection, rows.head_groups = "rows", "random", False
        rows.allocation, rows.coupled_rows, rows.disjoint_from = "uniform", None, None
        return rows

    def _head_size(self, config, module_key: str) -> int:
        """head_dim for the attention output projection when heads are the unit, else 1: plain columns on
        every other target, and on every target of a model whose heads the map does not know."""
        if not config.head_groups:
            return 1
        model_config = self.get_model_config(self.model)
        roles = architectures.known_roles(model_config)
        if roles is None or not (module_key == roles.attention_output or module_key.endswith("." + roles.attention_output)):
            return 1
        return architectures.head_dim(model_config)

    def _spread_budget(self, config) -> None:
        """Turn a total budget into the density that spreads it over the targets by size (once per config)."""
        if getattr(config, "_budget_spread", False):
            return
        total = 0
        for key, module in self.model.named_modules():
            base = module.get_base_layer() if isinstance(module, SparseLayer) else module
            if self._check_target_module_exists(config, key) and _layer_class(base) is not None:
                if self._row_partner(config, key) is not None:
                    continue  # coupled rows follow their partner's units: not part of the budget
                if isinstance(base, nn.Conv2d):
                    total += base.weight.numel()
                else:  # never weight.numel(): bitsandbytes packs 4-bit weights two to a byte
                    in_features, out_features = _get_in_out_features(base)
                    total += in_features * out_features
        if total == 0:
            return
        if config.num_trainable > total:
            raise ValueError(
                f"num_trainable={config.num_trainable:,} is more than the {total:,} weights of the target layers, "
                "which is all that can train: lower num_trainable or add target_modules"
            )
        config.density = config.num_trainable / total
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
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        state_dict = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if not state_dict and adapter_layers(model, adapter_name):
            raise ValueError(
                f"adapter {adapter_name!r}: the state_dict given to save holds none of its tensors, so the file would "
                "be empty. Under DeepSpeed ZeRO-3 the Trainer passes an empty one unless the DeepSpeed config sets "
                "zero_optimization.stage3_gather_16bit_weights_on_model_save: true (accelerate: zero3_save_16bit_model)"
            )
        # whole tensors: under FSDP2 every rank gathers its shards here, under ZeRO-3 every rank gathers the
        # partitioned ones (so every rank must call save_pretrained, with is_main_process=False on all but one).
        # Whether to gather is decided from the model, the same on every rank, never from the tensors given:
        # the Trainer hands rank 0 DeepSpeed's gathered copies and the others empty ones
        params = dict(model.named_parameters())
        partitioned = [k for k in state_dict if hasattr(params.get(k), "ds_id")]
        with gathered([params[k] for k in partitioned]):
            state_dict = {k: params[k].detach().clone() if k in partitioned else full(v) for k, v in state_dict.items()}
        regenerated = getattr(config, "store_indices", True) is False
        if regenerated:
            # SLTrain: the support is regenerated from the seed at load time, so the file holds values only
            state_dict = {k: v for k, v in state_dict.items() if f".{INDICES}." not in k and not k.endswith(f".{INDICES}")}
        return files.add_layer_records(model, adapter_name, files.pack_frozen(state_dict), regenerated)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # A refusal here leaves the model untouched; `PeftModel.from_pretrained` / `load_adapter` then take the
        # injected layers out again (_peft.install_load_guard).
        state_dict = files.unpack_frozen(state_dict)
        records = files.pop_layer_records(state_dict)
        files.add_optional_buffers(model, adapter_name, state_dict, cls.prefix)  # so that PEFT maps their keys too
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        files.check_and_fit(model, adapter_name, state_dict, cls.prefix, config, records)
        return state_dict


def _refuse_expert_targets(model: nn.Module, config) -> None:
    """Refuse, with the reason, target_modules that name mixture-of-experts weights kept as fused 3-D
    parameters (transformers 5's Mixtral, Qwen2-MoE, Qwen3-MoE experts): they are no layers to wrap."""
    experts = architectures.fused_experts(model)
    if not experts:
        return
    keys = [key for key, _ in model.named_modules()]
    listed = config.target_modules if isinstance(config.target_modules, (set, list)) else []
    for name, params in experts:
        paths = [f"{name}.{p}" for p in params]
        hits = [t for t in listed if not any(k == t or k.endswith("." + t) for k in keys)
                and any(t == p or p.endswith("." + t) for p in paths)]
        if hits or BaseTuner._check_target_module_exists(config, name):
            named = f"target_modules={sorted(hits)!r} name" if hits else "target_modules matches"
            raise ValueError(
                f"{named} the experts of {name}, which are fused 3-D parameters ({', '.join(params)}: experts x out x "
                f"in), not layers; sparse_peft adapts {SUPPORTED}, so they cannot train. Target the attention "
                "projections, and shared-expert or dense MLP layers where the model has them (e.g. 'all-linear')."
            )


def _combine(deltas, out_features: int, in_features: int):
    """Σ w · Δ on one layer: (sorted unique positions, summed values, stacked A, stacked w·s·B)."""
    ref = deltas[0][1].reference
    positions, values, lora_a, lora_b = [], [], [ref.new_zeros(0, in_features)], [ref.new_zeros(out_features, 0)]
    for w, delta in deltas:
        p, v = delta.sparse_entries()
        positions.append(p)
        values.append(w * v)
        if delta.lora_A is not None:
            lora_a.append(delta.lora_A.detach().to(ref.dtype))
            lora_b.append((w * delta.scaling) * delta.lora_B.detach().to(ref.dtype))
    unique, inverse = torch.unique(torch.cat(positions), sorted=True, return_inverse=True)
    summed = ref.new_zeros(unique.numel()).index_add_(0, inverse, torch.cat(values).detach().to(ref.dtype))
    return unique, summed, torch.cat(lora_a), torch.cat(lora_b, dim=1)


def _discard_adapter(model: nn.Module, adapter_name: str) -> bool:
    """Undo the injection of an adapter whose weights were refused, so the model is as before.
    Returns whether the model held sparse layers of that adapter."""
    found = False
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, SparseLayer) or adapter_name not in module._all_available_adapter_names():
            continue
        found = True
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
    return found


__all__ = ["SparseModel", "BaseTunerLayer"]
