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
import warnings
from typing import Optional

from ._base import Method, Run


__all__ = ["DEFAULT_METHOD", "KNOBS", "METHODS", "Method", "Run", "knob_fields", "lora_budget", "register_method"]


METHODS: dict[str, Method] = {}
KNOBS: dict[str, list[str]] = {}  # knob name -> the methods that have it


def register_method(cls: type, name: Optional[str] = None) -> Method:
    """Make `cls` (a `Method` subclass) available as `SparseConfig(method=name)`, by default `cls.name`.
    Re-registering a name with a class of the same module replaces it (a reload); another module's is
    refused."""
    name = name or getattr(cls, "name", "")
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not name:
        raise TypeError(f"{cls!r} is not a Method subclass with a name")
    previous = METHODS.get(name)
    if previous is not None and type(previous).__module__ != cls.__module__:
        raise ValueError(f"method {name!r} is registered already by {type(previous).__module__}")
    method = cls()
    method.name = name
    METHODS[name] = method
    for knob in knob_fields(method):
        KNOBS.setdefault(knob.name, [])
        if name not in KNOBS[knob.name]:
            KNOBS[knob.name].append(name)
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
                register_method(obj, name=info.name)  # the file's name is the method's name
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="sparse_peft.methods"):
            register_method(entry.load())
    except Exception as err:  # a broken third-party plugin must not break the package: say so
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
