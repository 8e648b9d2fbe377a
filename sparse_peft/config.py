from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._peft import SparsePeftType
from .methods import FLAT_FIELDS_BEFORE_KNOBS, KNOBS, METHODS, Method, knob_fields
from .selection import SELECTION_RULES
from .version import __version__


STRUCTURES = ("unstructured", "rows", "columns", "none")

# What a field is when neither the user nor the method sets it.
_GENERAL_DEFAULTS = dict(
    structure="unstructured",
    selection="random",
    density=0.01,
    r=0,
    head_groups=False,
    residual_rank=8,
    scale_sparse=False,
    store_indices=True,
)


@dataclass
class SparseConfig(PeftConfig):
    """
    This is the configuration class to store the configuration of a [`SparseModel`].

    A sparse adapter trains, on each target layer, an update ΔW made of a sparse part (single
    entries, whole output rows or whole input columns) and an optional low-rank part. `method`
    picks a published recipe; every general field it sets can still be overridden.

    Args:
        method (`str`, *optional*):
            A method's name (`sparse_peft.METHODS`: "spiel", "s2ft", "dsee", "sara", "lora_ggpo",
            "sltrain", ...), or None for the general fields alone.
        method_config (`dict`, *optional*):
            The method's own knobs (its page lists them); they may also be given as keyword arguments.
        structure (`str`, *optional*, defaults to `"unstructured"`):
            Shape of the sparse part: "unstructured" (single entries), "rows" (whole output rows),
            "columns" (whole input columns) or "none" (low-rank only).
        density (`float`, *optional*, defaults to `0.01`):
            Fraction of each target weight's entries (unstructured), rows or columns that train.
        equivalent_rank (`int`, *optional*):
            If set, replaces `density`: each layer trains as many parameters as a LoRA of this rank
            would, r·(in + out), the low-rank part included.
        num_trainable (`int`, *optional*):
            If set, replaces `density` and `equivalent_rank`: the total number of sparse parameters
            over all target layers, spread in proportion to each layer's size.
        module_density (`dict[str, float]`, *optional*):
            Densities for particular modules, by name suffix; other targets use `density`.
        head_groups (`bool`, *optional*, defaults to `False`):
            Choose the input columns of attention output projections in whole heads.
        disjoint_from (`list[str]`, *optional*):
            Adapters whose supports this one must avoid (for fusion).
        allocation (`str`, defaults to `"uniform"`):
            "uniform": each layer trains its own budget. "global": the same total, pooled over the
            layers per module (all o_proj heads, all down_proj channels), so counts vary by layer;
            without module_density the roles keep one total (a head rounded up takes channels back).
        coupled_rows (`list[str]`, *optional*):
            S²FT's other side: also train the output rows that produce the chosen units, by role:
            "ffn_up" (up and gate rows of the chosen FFN channels), "value" (value rows of the
            chosen heads). Needs structure="columns".
        selection (`str`, *optional*, defaults to `"random"`):
            How the support is chosen: "random", "magnitude" (largest |w|), "activation" (input
            columns of largest norm on calibration data), "weight_activation" (|w|·‖x_col‖), "gradient"
            (input columns of largest loss gradient on calibration data), or the "small_" variant of
            each. The activation and gradient rules need `sparse_peft.calibrate`.
        r (`int`, *optional*, defaults to `0`):
            Rank of the low-rank part; 0 for none.
        lora_alpha (`float`, *optional*):
            The low-rank part is scaled by lora_alpha / r; defaults to r (a scale of 1).
        residual_rank (`int`, *optional*, defaults to `8`):
            DSEE: rank of the low-rank fit whose residual "lowrank_residual" scores.
        scale_sparse (`bool`, *optional*, defaults to `False`):
            Scale the sparse part by lora_alpha / r too (DSEE).
        store_indices (`bool`, *optional*, defaults to `True`):
            False (SLTrain): the random support is regenerated from the seed and not saved.
        seed (`int`, defaults to `0`):
            Seed of the random supports; each module derives its own from it and its name.
        init_weights (`bool`, defaults to `True`):
            True starts from ΔW = 0. False starts from random non-zero values (for tests).
        target_modules (`Union[list[str], str]`, *optional*):
            Module names, a regex, or "all-linear" (every linear layer but the output head).
        exclude_modules (`Union[list[str], str]`, *optional*):
            Module names or a regex of modules never to adapt.
        layers_to_transform (`Union[list[int], int]`, *optional*):
            Only adapt layers with these indices.
        layers_pattern (`Union[list[str], str]`, *optional*):
            Name of the layer list, with `layers_to_transform`, if it is not the usual one.
        bias (`str`, defaults to `"none"`):
            "none", "all" or "sparse_only": which biases also train.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the adapted layers that train and are saved whole.
        trainable_token_indices (`Union[list[int], dict[str, list[int]]]`, *optional*):
            Token rows of the embedding to train (TRL sets this when a chat template adds tokens).
    """

    method: Optional[str] = field(
        default=None,
        metadata={
            "help": "Published recipe, by name: one of the methods in sparse_peft.METHODS ('spiel', 's2ft', 'dsee', "
            "'sara', 'lora_ggpo', 'sltrain', ... and any registered by another package). Its values fill every general "
            "field left unset, and its own knobs go in `method_config`. None uses the general fields alone."
        },
    )
    method_config: Optional[dict] = field(
        default=None,
        metadata={
            "help": "The method's own knobs, e.g. {'reselection_steps': 20} for 'spiel' (each method's page lists "
            "them; they may also be passed as keyword arguments of SparseConfig). Unset knobs take the method's "
            "values; the adapter file saves them all."
        },
    )
    structure: Optional[Literal["unstructured", "rows", "columns", "none"]] = field(
        default=None,
        metadata={
            "help": "Shape of the sparse part: 'unstructured' (single entries), 'rows' (output rows), 'columns' "
            "(input columns) or 'none' (low-rank only). Defaults to the method's, else 'unstructured'."
        },
    )
    density: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction of each target weight's entries (unstructured), rows or columns that train, in (0, 1]. "
            "Defaults to the method's, else 0.01."
        },
    )
    equivalent_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "If set, replaces `density`: each layer trains as many parameters as a LoRA of this rank would, "
            "r*(in + out), the low-rank part (if r > 0) included. For comparisons with LoRA at an equal budget."
        },
    )
    num_trainable: Optional[int] = field(
        default=None,
        metadata={
            "help": "If set, replaces `density` and `equivalent_rank`: the total number of sparse parameters over all "
            "target layers, spread in proportion to each layer's size (SpIEL's budget). The density it gives is "
            "written into `density` when the adapter is created."
        },
    )
    selection: Optional[
        Literal[
            "random", "magnitude", "small_magnitude", "activation", "small_activation", "weight_activation",
            "small_weight_activation", "gradient", "small_gradient", "lowrank_residual",
        ]
    ] = field(
        default=None,
        metadata={
            "help": "How the support is chosen: 'random', 'magnitude' (largest |w|, or row/column norms), "
            "'activation' (input columns of largest norm on calibration data), 'weight_activation' (largest "
            "|w|*||x_col||, Wanda's score), 'gradient' (input columns of largest loss gradient ||dL/dW[:, c]|| on "
            "calibration data with labels), or the 'small_' variant of each; 'lowrank_residual' (DSEE: largest "
            "entries of W minus its rank-`residual_rank` fit). The activation and gradient rules need "
            "`sparse_peft.calibrate(model, batches)` before training. Defaults to the method's, else 'random'."
        },
    )
    module_density: Optional[dict[str, float]] = field(
        default=None,
        metadata={
            "help": "Densities for particular modules, by name suffix, e.g. {'o_proj': 0.05, 'down_proj': 0.02}; "
            "other targets use `density`."
        },
    )
    head_groups: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Choose the input columns of attention output projections in whole heads (blocks of head_dim), "
            "from the architecture's map. Defaults to the method's (True for 's2ft'), else False."
        },
    )
    disjoint_from: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Names of adapters already in the model whose supports this one must avoid, so that the two "
            "can be fused (merged together) without overlapping."
        },
    )
    allocation: Literal["uniform", "global"] = field(
        default="uniform",
        metadata={
            "help": "How a structured budget is spread over layers. 'uniform': every layer trains its own budget. "
            "'global': one pool per module role over all layers (all attention-output heads, all FFN down "
            "channels), the layers' shares summed and rounded to whole units once (so a layer may get none, where "
            "'uniform' gives each at least one), then picked by `selection` (the top scores of the pool, or a "
            "uniform draw for 'random'), so each layer's count varies. Without `module_density` the roles keep one "
            "total: pools are rounded coarsest unit first and each later pool makes up what the earlier ones "
            "rounded away (a head of o_proj rounded up takes FFN channels back). Needs structure 'rows' or "
            "'columns'."
        },
    )
    coupled_rows: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Roles whose output rows also train, at the same units as the columns chosen on their consumer "
            "in the same layer: 'ffn_up' (up and gate rows of the chosen FFN channels of down_proj) and 'value' "
            "(value-projection rows of the heads chosen on the attention output; under grouped-query attention, "
            "every key/value head a chosen query head reads). Their modules are added to the targets. Needs "
            "structure='columns'."
        },
    )
    r: Optional[int] = field(
        default=None,
        metadata={"help": "Rank of the low-rank part (B @ A); 0 for none. Defaults to the method's, else 0."},
    )
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "The low-rank part is scaled by lora_alpha / r. Defaults to r, a scale of 1."},
    )
    residual_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "DSEE, selection='lowrank_residual': rank of the low-rank fit of each pretrained weight; the "
            "support is the largest entries of the residual W - W_r. Defaults to 8."
        },
    )
    scale_sparse: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Scale the sparse part by lora_alpha / r too, as DSEE's code does (True for method='dsee'). "
            "Defaults to False: the sparse part is unscaled."
        },
    )
    store_indices: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Save the support's indices in the adapter file. False (SLTrain) needs selection='random': the "
            "support is then drawn by a portable generator from `seed` and each module's name, identical on "
            "every device and torch version, and regenerated at load time. Defaults to True, False for 'sltrain'."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random supports; each module derives its own from it and its name."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True starts from a zero update (the model is unchanged). False starts from random non-zero "
            "values, which only tests want."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names of the modules to adapt, a regex over full module names, or 'all-linear' for every linear "
            "layer except the output head. Defaults to the method's choice from its paper (see the method's page), "
            "reported in one log line."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Names of modules, or a regex, never to adapt."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices in the model's layer list."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers', 'h'), with layers_to_transform, if not the usual."},
    )
    bias: Literal["none", "all", "sparse_only"] = field(
        default="none",
        metadata={"help": "Which biases also train: 'none', 'all', or 'sparse_only' (those of adapted layers)."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapted layers that train and are saved whole, e.g. a classifier head."},
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": "Token rows of the embedding to train, as a list of ids or {module name: ids}. TRL sets this when "
            "a chat template adds tokens."
        },
    )
    sparse_peft_version: Optional[str] = field(
        default=None,
        metadata={"help": "Version of sparse_peft that created the adapter; filled in automatically."},
    )

    def __post_init__(self):
        # A config rebuilt from a saved dict (adapter_config.json, `SparseConfig(**config.to_dict())`) carries its
        # peft_type and has every field filled in already: only its values are checked, not which ones were given.
        rebuilt = self.peft_type is not None
        flat = self.__dict__.pop("_flat_knobs", {})  # knobs passed as keyword arguments (see __init__ below)
        super().__post_init__()
        self.peft_type = SparsePeftType.SPARSE
        if self.sparse_peft_version is None:
            self.sparse_peft_version = __version__
        for name in ("coupled_rows", "disjoint_from"):  # one name for a list of one
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        _check_types(self)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        # the names the user set, for refusing knobs that would have no effect; none for a rebuilt config
        self.given = set() if rebuilt else {f for f in _UNSET_BY_DEFAULT if getattr(self, f) is not None}
        if not rebuilt:
            self._refuse_conflicts()
        self._resolve_method(flat, rebuilt)
        self._apply_method()
        self._validate()
        self._refuse_unused(self.given)
        self.method_impl.check(self)

    @property
    def method_impl(self) -> Method:
        """The method object (methods/<name>.py), or a plain `Method` for method=None."""
        return METHODS[self.method] if self.method is not None else _NO_METHOD

    def _resolve_method(self, flat: dict, rebuilt: bool) -> None:
        """Route the knobs (keyword arguments or `method_config`) to the method that owns them, infer the
        method from them when none is named, and build its `Knobs`."""
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)} or None")
        nested = dict(self.method_config or {})
        routed = {}
        for name, value in flat.items():
            owners = KNOBS.get(name, [])
            if value is None and not rebuilt:
                continue  # None leaves a knob to the method, as it leaves a general field to it
            if self.method is not None and self.method in owners:
                routed[name] = value
            elif rebuilt and name in FLAT_FIELDS_BEFORE_KNOBS and value == FLAT_FIELDS_BEFORE_KNOBS[name]:
                continue  # another method's knob at its "off" value: files saved before knobs were nested hold them all
            elif self.method is None:
                routed[name] = value  # its method is inferred below
            else:
                raise ValueError(
                    f"{name}={value!r} is a knob of method {' / '.join(owners)}, not of method={self.method!r}: "
                    f"remove it, or use method={owners[0]!r}"
                )
        if self.method is None and (routed or nested):
            candidates = None
            for name in {**nested, **routed}:
                owners = set(KNOBS.get(name, []))
                if not owners:
                    raise ValueError(f"{name!r} is no field of SparseConfig and no knob of any method "
                                     f"({sorted(METHODS)}); check the name")
                candidates = owners if candidates is None else candidates & owners
            if len(candidates or ()) != 1:
                raise ValueError(
                    f"the knobs {sorted({**nested, **routed})} do not belong to one method (owners: "
                    f"{ {n: KNOBS.get(n) for n in {**nested, **routed}} }): name the method with method=..."
                )
            self.method = candidates.pop()  # the knobs say which method this is
        overlap = sorted(set(nested) & set(routed))
        if overlap:
            raise ValueError(f"{overlap} given both as keyword arguments and in method_config: give each once")
        method = self.method_impl
        names = {f.name for f in knob_fields(method)}
        values = {**nested, **routed}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"method={self.method!r} has no knob {unknown[0]!r}" + (f" (its knobs: {sorted(names)})" if names else
                " (it has no knobs)") + "; remove it, or name the method it belongs to"
            )
        self.given |= set(values) if not rebuilt else set()
        if method.Knobs is None:
            self.knobs, self.method_config = None, None
            return
        hints = typing.get_type_hints(method.Knobs)
        for name, value in values.items():
            if not _matches(value, hints[name]):
                raise ValueError(
                    f"{self.method} knob {name} = {value!r} ({type(value).__name__}) must be {_describe(hints[name])}; "
                    "correct it where the config is made (in adapter_config.json's method_config for a saved adapter)"
                )
        self.knobs = method.Knobs(**values)
        self.method_config = dataclasses.asdict(self.knobs)

    def __getattr__(self, name):
        # a method's knobs read like fields (config.reselection_steps); only called when no attribute matches
        knobs = self.__dict__.get("knobs")
        if knobs is not None and name in {f.name for f in dataclasses.fields(knobs)}:
            return getattr(knobs, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        # ... and are set like fields: into the knobs and method_config, never as a stray attribute that
        # nothing reads
        knobs = self.__dict__.get("knobs")
        if knobs is not None and name not in _FIELDS and name in {f.name for f in dataclasses.fields(knobs)}:
            setattr(knobs, name, value)
            self.method_config[name] = value
            return
        super().__setattr__(name, value)

    def _refuse_conflicts(self) -> None:
        """Two fields the user set that answer the same question: one would silently win."""
        budgets = [name for name in ("density", "equivalent_rank", "num_trainable") if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise ValueError(
                f"{' and '.join(f'{n}={getattr(self, n)!r}' for n in budgets)} both set the per-layer budget, and only one "
                "can apply: keep one of density (a fraction), equivalent_rank (LoRA parity) or num_trainable (a total)"
            )

    def _refuse_unused(self, given: set) -> None:
        """Fields the user set that the resolved config would ignore: refuse rather than drop them silently."""

        def refuse(names, why):
            set_here = [n for n in names if n in given]
            if set_here:
                shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in set_here)
                raise ValueError(f"{shown} has no effect {why}; remove it or enable what it tunes")

        if not self.r:
            refuse(("lora_alpha",), "without a low-rank part (r=0): set r > 0")
            if self.scale_sparse and "scale_sparse" in given:
                refuse(("scale_sparse",), "without a low-rank part (r=0), whose lora_alpha / r it applies: set r > 0")
        if self.selection != "lowrank_residual":
            refuse(("residual_rank",), f"with selection={self.selection!r}: it is the rank of selection='lowrank_residual'")

    def _apply_method(self) -> None:
        defaults = dict(_GENERAL_DEFAULTS)
        if self.method is not None:
            method = METHODS[self.method]
            defaults.update(method.defaults)
            if method.missing and not self.inference_mode:
                # _apply_method <- __post_init__ <- the dataclass __init__ <- the user's line
                warnings.warn(f"method={self.method!r} is incomplete in this release: {method.missing}.", stacklevel=4)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _validate(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r} is not one of {STRUCTURES}")
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTION_RULES}")
        if self.selection in ("gradient", "small_gradient") and self.structure != "columns":
            raise ValueError(
                f"selection={self.selection!r} scores input columns by their weight gradient: use structure='columns'"
            )
        if self.selection.endswith("activation") and (
            self.structure in ("rows", "none")
            or (self.structure == "unstructured" and self.selection.removeprefix("small_") == "activation")
        ):
            raise ValueError(
                f"selection={self.selection!r} scores input columns: use structure='columns', or "
                "'weight_activation' for single entries"
            )
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r={self.r!r} must be an integer >= 0 (0 disables the low-rank part)")
        if self.structure == "none" and self.r == 0:
            raise ValueError("structure='none' trains no sparse part, so r must be > 0; or pick a structure")
        if self.num_trainable is not None and (not isinstance(self.num_trainable, int) or self.num_trainable <= 0):
            raise ValueError(f"num_trainable={self.num_trainable!r} must be a positive integer or None")
        if self.num_trainable is not None and self.equivalent_rank is not None:
            raise ValueError("set one of num_trainable and equivalent_rank, not both")
        if self.equivalent_rank is not None:
            if not isinstance(self.equivalent_rank, int) or self.equivalent_rank <= 0:
                raise ValueError(f"equivalent_rank={self.equivalent_rank!r} must be a positive integer or None")
            if self.structure != "none" and self.equivalent_rank <= self.r:
                raise ValueError(
                    f"equivalent_rank={self.equivalent_rank} leaves no budget for the sparse part next to the "
                    f"low-rank part of rank r={self.r}: raise equivalent_rank or lower r"
                )
        elif not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density={self.density!r} must be in (0, 1], e.g. 0.01 for 1% of the entries")
        for suffix, density in (self.module_density or {}).items():
            if not (isinstance(density, (int, float)) and 0 < density <= 1):
                raise ValueError(f"module_density[{suffix!r}]={density!r} must be in (0, 1]")
        self._validate_supports()
        if self.head_groups and self.structure != "columns":
            raise ValueError("head_groups=True chooses input columns in whole heads, so it needs structure='columns'")
        if self.allocation not in ("uniform", "global"):
            raise ValueError(f"allocation={self.allocation!r}: use 'uniform' (a budget per layer) or 'global' (pooled)")
        if self.allocation == "global" and self.structure not in ("rows", "columns"):
            raise ValueError(
                f"allocation='global' pools whole rows or columns over layers, not {self.structure!r} entries: "
                "use structure='rows' or 'columns', or allocation='uniform'"
            )
        if self.coupled_rows:
            unknown = sorted(set(self.coupled_rows) - {"ffn_up", "value"})
            if unknown:
                raise ValueError(
                    f"coupled_rows has unknown roles {unknown}: use 'ffn_up' (up/gate rows of the chosen FFN "
                    "channels) and/or 'value' (value rows of the chosen heads)"
                )
            if self.structure != "columns":
                raise ValueError(
                    "coupled_rows trains the rows that produce the input columns chosen on the output projections, "
                    f"so it needs structure='columns' (got {self.structure!r})"
                )
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if self.bias not in ("none", "all", "sparse_only"):
            raise ValueError(f"bias={self.bias!r} must be 'none', 'all' or 'sparse_only'")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern only applies together with layers_to_transform")

    def _validate_supports(self) -> None:
        """The general support pieces: a low-rank-residual rule, a support regenerated from the seed."""
        if self.selection == "lowrank_residual" and self.structure != "unstructured":
            raise ValueError("selection='lowrank_residual' scores single entries: use structure='unstructured'")
        if not isinstance(self.residual_rank, int) or self.residual_rank < 1:
            raise ValueError(f"residual_rank={self.residual_rank!r} must be an integer >= 1")
        if not self.store_indices:
            if self.selection != "random" or self.structure != "unstructured":
                raise ValueError("store_indices=False regenerates a fixed random support from the seed: it needs "
                                 "selection='random' and structure='unstructured'")
            if self.disjoint_from:
                raise ValueError("store_indices=False cannot avoid other adapters' supports (disjoint_from)")

    @property
    def scaling(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r if self.r else 0.0

    def density_for(self, module_key: str) -> float:
        for suffix, density in (self.module_density or {}).items():
            if module_key == suffix or module_key.endswith("." + suffix):
                return density
        return self.density

    def budget(self, structure: str, out_features: int, in_features: int, module_key: str = "", group: int = 1) -> int:
        """How many entries (unstructured), rows or columns a layer of this shape trains.

        Rows and columns come in whole groups of `group` (heads); the count is a multiple of it.
        """
        return self.pool_budget(structure, out_features, in_features, [module_key], group)

    def pool_budget(self, structure: str, out_features: int, in_features: int, module_keys: list[str],
                    group: int = 1, extra: float = 0.0) -> int:
        """How many entries, rows or columns the layers `module_keys` (all of this shape) train together, as one
        pool (allocation="global"): each layer's share summed, plus `extra` (what pools rounded before this one
        left over, in this pool's units; negative where they took more), then rounded to whole groups once, at
        least one group in the pool rather than in every layer. One key: a layer's own budget."""
        k = self.pool_share(structure, out_features, in_features, module_keys) + extra
        units = min(_units(structure, out_features, in_features) * len(module_keys) // group, max(1, round(k / group)))
        return units * group

    def pool_share(self, structure: str, out_features: int, in_features: int, module_keys: list[str]) -> float:
        """The layers' budgets summed before any rounding, in entries, rows or columns."""
        return sum(self._share(structure, out_features, in_features, key) for key in module_keys)

    def _share(self, structure: str, out_features: int, in_features: int, module_key: str) -> float:
        """A layer's budget before rounding to whole groups."""
        own = self.method_impl.budget(self, structure, out_features, in_features)
        if own is not None:  # the method counts its own units (e.g. PaCA's r columns)
            k = own
        elif self.equivalent_rank is not None:
            # what a LoRA of that rank trains, less what our own low-rank part already does
            k = (self.equivalent_rank - self.r) * (in_features + out_features) / unit_size(structure, out_features,
                                                                                           in_features)
        else:
            k = self.density_for(module_key) * _units(structure, out_features, in_features)
        return k


def _units(structure: str, out_features: int, in_features: int) -> int:
    """How many entries, rows or columns a layer of this shape has."""
    return {"unstructured": out_features * in_features, "rows": out_features, "columns": in_features}[structure]


def unit_size(structure: str, out_features: int, in_features: int) -> int:
    """The parameters in one unit of a layer of this shape: an entry, a row (in_features), a column (out_features)."""
    return {"unstructured": 1, "rows": in_features, "columns": out_features}[structure]


_FIELDS = {f.name for f in dataclasses.fields(SparseConfig)}
_NO_METHOD = Method()  # method=None: the general fields alone, no knobs, no per-step work
_dataclass_init = SparseConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    # a method's knobs may be passed as keyword arguments (SparseConfig(method="spiel", reselection_steps=10)),
    # as adapter files written before knobs were nested hold them: __post_init__ routes them to the method
    own = {f.name for f in dataclasses.fields(SparseConfig)}
    self.__dict__["_flat_knobs"] = {k: kwargs.pop(k) for k in list(kwargs) if k not in own and (
        k in KNOBS or k in FLAT_FIELDS_BEFORE_KNOBS)}
    _dataclass_init(self, *args, **kwargs)


SparseConfig.__init__ = _init


# fields whose default is None, "not set": a value there was given by the user
_UNSET_BY_DEFAULT = [
    f.name for f in dataclasses.fields(SparseConfig) if f.name in SparseConfig.__annotations__ and f.default is None
]


# -- types ---------------------------------------------------------------------------------------------
def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, set):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a dict of {_describe(args[0])} to {_describe(args[1])}" if args else "a dict"
    return {type(None): "None", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        # a string outside the choices is left to the field's own check, which names the choices and the fix
        return isinstance(value, str) or any(value == a and type(value) is type(a) for a in args)
    if origin in (list, set):
        return isinstance(value, (list, set, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp) if isinstance(tp, type) else True


def _check_types(config: SparseConfig) -> None:
    """Every field of ours against its annotation, so a hand-edited adapter_config.json (`"density": "0.1"`,
    `"seed": "x"`, `"target_modules": 5`) is refused with the field's name, not a TypeError deep inside."""
    hints = typing.get_type_hints(SparseConfig)
    for name in SparseConfig.__annotations__:
        value = getattr(config, name)
        if not _matches(value, hints[name]):
            raise ValueError(
                f"SparseConfig.{name} = {value!r} ({type(value).__name__}) must be {_describe(hints[name])}; "
                "correct it where the config is made (in adapter_config.json for a saved adapter)"
            )
