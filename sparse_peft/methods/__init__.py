"""Methods: each file here is one method, discovered by its name.

A method is a subclass of `Method` (in the spirit of PEFT's `LoraVariant`). It owns everything that
is its own: its preset of the general `SparseConfig` fields, its knobs (a dataclass, `Knobs`, whose
values sit in `SparseConfig.method_config` and in adapter files), its support rule if it has one,
its per-step work, its lines of the model card. The core calls it through the hooks below and never
tests a method's name or reads a method's knob.

Adding a method is dropping `methods/<name>.py` in, with one `Method` subclass: `method="<name>"`
then works everywhere (config, CLI, model card, the per-method test suite). Another package registers
one with `register_method(cls)` or a `sparse_peft.methods` entry point.

A method file holds no autograd and no PEFT plumbing; if it needs a special case in the core, the
core is missing a general piece (selection.py, regrowth.py, perturbation.py, delta.py, ops.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Run:
    """What a method's per-step work sees of a training run: the adapter, its config, its layers, the
    run's length (None when not known), and the optimizer (None until the first step binds it)."""

    adapter: str
    config: Any
    layers: dict = field(default_factory=dict)  # name -> sparse layer holding the adapter
    total: Optional[int] = None
    optimizer: Any = None


class Method:
    """One sparse fine-tuning method. Subclass it in `methods/<name>.py`; every hook has a default."""

    name: str = ""
    title: str = ""
    paper: str = ""
    # values for the general SparseConfig fields the user leaves unset
    defaults: dict = {}
    # its own fields (a dataclass; every field with metadata={"help": ...}), or None
    Knobs: Optional[type] = None
    # the layers it adapts when the user names none (architectures.default_targets): "all-linear",
    # "all-layers" (with Conv2d), "query_value", or "roles" with `target_roles` from the architecture map
    default_targets: str = "all-linear"
    target_roles: tuple = ()
    # what of the method is not built yet: non-empty makes SparseConfig warn when it is chosen
    missing: str = ""

    def check(self, config) -> None:
        """Refuse (ValueError, naming the field and the fix) knob values that clash with the general fields."""

    def has_steps(self, config) -> bool:
        """Whether this adapter has work between optimizer steps (then it gets a scheduler when created)."""
        return False

    def run_length_needed(self, config) -> str:
        """Why the per-step work needs the run's total number of optimizer steps; "" when it does not."""
        return ""

    def steps(self, run: Run) -> list:
        """The per-step work of a run: objects with any of `before_optimizer_step(t) -> dict` (gradients
        complete and clipped), `after_optimizer_step(t) -> dict` (after the update), `state_dict()` /
        `load_state_dict(state, t)` (checkpoints) and `retire()` (another scheduler took over)."""
        return []

    def choose_support(self, layer, config, module_key: str, k: int, exclude):
        """A support of its own for one layer ((positions, count) of an unstructured part), or None for
        the general rule of `config.selection`."""
        return None

    def budget(self, config, structure: str, out_features: int, in_features: int) -> Optional[int]:
        """Units per layer of its own (e.g. a column count), or None for the general budget."""
        return None

    def card_lines(self, config) -> list[str]:
        """Its extra lines in the model card."""
        return []


METHODS: dict[str, Method] = {}
KNOBS: dict[str, list[str]] = {}  # knob name -> the methods that have it


def register_method(cls: type) -> Method:
    """Make `cls` (a `Method` subclass) available as `SparseConfig(method=cls.name)`. Re-registering a
    name replaces it (a reload); two different classes under one name are refused."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    previous = METHODS.get(cls.name)
    if previous is not None and type(previous).__qualname__ != cls.__qualname__:
        raise ValueError(f"method {cls.name!r} is registered already by {type(previous).__module__}")
    METHODS[cls.name] = method = cls()
    for knob in knob_fields(method):
        KNOBS.setdefault(knob.name, [])
        if cls.name not in KNOBS[knob.name]:
            KNOBS[knob.name].append(cls.name)
    return method


def knob_fields(method: Optional[Method]) -> tuple:
    return dataclasses.fields(method.Knobs) if method is not None and method.Knobs is not None else ()


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj is not Method and obj.__module__ == module.__name__:
                register_method(obj)
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="sparse_peft.methods"):
            register_method(entry.load())
    except Exception as err:  # a broken third-party plugin must not break the package: say so
        import warnings

        warnings.warn(f"a sparse_peft.methods entry point failed to load ({err}); its method is unavailable")


# Adapter files written before methods had knobs of their own hold every method's knobs as flat
# fields, at these values where a method did not use them: they are dropped on load.
FLAT_FIELDS_BEFORE_KNOBS = dict(
    reselection_steps=0, accumulation_steps=5, initial_reselection_rate=0.2, reselection_rate_policy="linear",
    regrowth="gradient", threshold=None, nuclear_norm_weight=0.0, nuclear_norm_layers=1, nuclear_norm_rank=None,
    progressive_step=None, perturbation="none", perturbation_sigma=0.03, perturbation_beta=0.01,
)

# the quickstart's and the CLI's method when none is named (best eval loss against LoRA in the benchmarks)
DEFAULT_METHOD = "dsee"


def lora_budget(name: str, rank: int) -> dict:
    """The `SparseConfig` fields that give method `name` the trainable count of a LoRA of rank `rank`
    on the same layers: `r` for a low-rank-only preset, half the rank to each part for a preset
    with a low-rank part of its own (`r=rank // 2` next to `equivalent_rank=rank`), else
    `equivalent_rank`. Comparisons with LoRA (the quickstart, the benchmarks) start here."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    preset = METHODS[name].defaults
    if preset.get("structure") == "none":
        return dict(r=rank)
    if preset.get("r"):
        if rank < 2:
            raise ValueError(f"rank={rank} is too small to share between {name}'s sparse and low-rank parts; use rank >= 2")
        return dict(r=rank // 2, equivalent_rank=rank)
    return dict(equivalent_rank=rank)


_discover()
