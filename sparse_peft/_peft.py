"""The one place that touches PEFT's internals: the peft-type enum and the registry dicts.

PEFT's `register_peft_method` only accepts names that are already members of its closed
`PeftType` enum. We use our own `(str, Enum)` whose member's name equals its value: it hashes and
compares like the string "SPARSE", so the `peft_type` read back from an adapter_config.json finds
our entries in PEFT's registry, and it still has the `.value` that transformers reads. Needs
peft >= 0.21, whose state-dict hooks let an unknown type save and load.

All six methods share this one type (a `method` field tells them apart): PEFT refuses to put
adapters of different peft types in one model, and we want any mix of methods side by side.
"""

from __future__ import annotations

import enum


class SparsePeftType(str, enum.Enum):
    # name == value is required: see the module docstring
    SPARSE = "SPARSE"


PREFIX = "sparse_"


def register(config_cls, model_cls) -> None:
    """Register the sparse method with PEFT. Safe to call again (re-import, importlib.reload)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    if "SPARSE" in PeftType.__members__:
        # PEFT itself now has a method of this name: we cannot take it over silently.
        existing = PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.SPARSE)
        if existing is not None and existing.__module__.split(".")[0] != "sparse_peft":
            raise RuntimeError(
                "This PEFT version ships its own 'SPARSE' method, which clashes with sparse_peft; "
                "install a peft version that sparse_peft supports (see its pyproject.toml)"
            )
        key = PeftType.SPARSE
        if existing is None:
            register_peft_method(name="sparse", config_cls=config_cls, model_cls=model_cls, prefix=PREFIX)
            return
    else:
        key = SparsePeftType.SPARSE
    previous = PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if previous is not None and previous.__module__.split(".")[0] != "sparse_peft":
        raise RuntimeError(f"another package ({previous.__module__}) already registered the PEFT type 'SPARSE': "
                           "the two cannot be used in one process; import only one of them")
    clashing = [pt for pt, prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items() if prefix == PREFIX and pt != key]
    if clashing:
        raise RuntimeError(f"the parameter prefix {PREFIX!r} is already used by PEFT type {clashing[0]}: that "
                           "method and sparse_peft cannot be used in one process; import only one of them")
    # Plain assignment rather than a "registered already" check: after importlib.reload the classes
    # are new objects, and the registry must point at the live ones.
    PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[key] = model_cls


def all_linear_layer_names(model, task_type=None) -> set[str]:
    """PEFT's own resolution of target_modules="all-linear" for this model (every linear layer but the
    output head and adapter internals), through its private helper."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    config = SimpleNamespace(target_modules="all-linear", task_type=task_type)
    return set(_maybe_include_all_linear_layers(config, model).target_modules)


def install_model_card_hook(update_card) -> None:
    """Have `PeftModel.save_pretrained` (hence `push_to_hub`'s save too) add our section to the model card.

    PEFT writes the card in `PeftModel.create_or_update_model_card`; we wrap it, once, and only act
    for models that hold a sparse adapter.
    """
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_sparse_peft", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if any(getattr(c, "peft_type", None) == "SPARSE" for c in self.peft_config.values()):
            update_card(output_dir, self)

    create_or_update_model_card._sparse_peft = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def install_load_guard(discard) -> None:
    """Make loading a sparse adapter all-or-nothing, and say which file failed.

    PEFT injects an adapter's layers before it reads the adapter file, and leaves them in place when
    reading or checking the file fails (a truncated download, a file for another base model). Around
    `PeftModel.from_pretrained` and `PeftModel.load_adapter`, a failure that left sparse layers behind
    calls `discard(model, adapter_name)` (the model as it was: base layers back, no config) and
    re-raises as a ValueError that names the adapter's location. Other PEFT types pass untouched.
    """
    from peft import PeftModel

    if getattr(PeftModel.load_adapter, "_sparse_peft", False):
        return
    original_load = PeftModel.load_adapter
    original_from_pretrained = PeftModel.__dict__["from_pretrained"].__func__

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        existed = adapter_name in self.peft_config
        try:
            return original_load(self, model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            if existed or not discard(self, adapter_name):
                raise
            raise _explained(err, model_id) from err

    def from_pretrained(cls, model, model_id, adapter_name="default", *args, **kwargs):
        tags = list(getattr(model, "model_tags", None) or [])
        had_tags = getattr(model, "model_tags", None) is not None
        try:
            return original_from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        except Exception as err:
            if not discard(model, adapter_name):
                raise
            if getattr(model, "peft_config", None) == {}:
                del model.peft_config
            if had_tags:
                model.model_tags = tags
            elif hasattr(model, "model_tags"):
                model.model_tags = None
            raise _explained(err, model_id) from err

    load_adapter._sparse_peft = True
    PeftModel.load_adapter = load_adapter
    PeftModel.from_pretrained = classmethod(from_pretrained)


def _explained(err: Exception, model_id) -> ValueError:
    where = str(model_id)
    if type(err).__name__ == "SafetensorError" or isinstance(err, (OSError, EOFError)):
        return ValueError(
            f"cannot read the sparse adapter at {where!r} ({type(err).__name__}: {err}): adapter_model.safetensors "
            "is truncated or corrupt; download or save it again. The model was left as it was."
        )
    return ValueError(f"cannot load the sparse adapter at {where!r}: {err} (the model was left as it was)")
